"""LeNet's three operators (lenet_forward, lenet_train_forward, lenet_backward):
the CPU's tiles and per-thread chunks, the whole-batch implementation other
devices run, opcheck, and bad input through every path."""

import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

from lenet_ext import LeNet
from lenet_ext.model import lenet_args
from lenet_ext.ops import LENET_PARAMS

from conftest import CPU_KERNELS, DEVICES, d2l_net, outputs_and_grads, requires_cuda, twin_pair
from conftest import LENET_TOLERANCES as TOLERANCES
from test_tile_programs import assert_grads_match, backward_inputs, random_lenet_args, reference, reference_grads


@pytest.fixture
def num_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("batch", [65, 64 * 3 + 5])
@pytest.mark.parametrize("num_threads", [1, 2, 3, 16], indirect=True)
def test_inference_in_tiles_of_the_batch(context, batch, num_threads):
    """Batches over 64 images run through the network in tiles, a whole number per thread."""
    net, ref = twin_pair(torch.float64)
    x = torch.rand(batch, 1, 28, 28, dtype=torch.float64)
    with getattr(torch, context)():
        out = net(x)
        want = ref(x)
    torch.testing.assert_close(out, want, **TOLERANCES[torch.float64])
    args = list(lenet_args(x, net))
    args[LENET_PARAMS.index("fc1_weight") + 1] = torch.randn(120, 399, dtype=torch.float64)
    with getattr(torch, context)(), pytest.raises(ValueError, match="fc1_weight"):
        torch.ops.lenet_ext.lenet_forward(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("batch", [65, 64 * 3 + 5])
@pytest.mark.parametrize("num_threads", [1, 2, 3, 16], indirect=True)
def test_training_in_tiles_of_the_batch(batch, num_threads, dtype):
    """Training batches over 64 images run forward and backward in tiles, each thread summing its own gradients."""
    net, ref = twin_pair(dtype)
    x = torch.rand(batch, 1, 28, 28, dtype=dtype)
    target = torch.randint(0, 10, (batch,))
    out, grad_x, grads = outputs_and_grads(net, x, target)
    # float32 against the reference in float64: the sums over the batch differ in order.
    ref = ref.double()
    ref_out, ref_grad_x, ref_grads = outputs_and_grads(ref, x.double(), target)
    tol = TOLERANCES[torch.float64] if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(out, ref_out.to(dtype), **tol)
    torch.testing.assert_close(grad_x, ref_grad_x.to(dtype), **tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want.to(dtype), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_lenet_train_forward_and_backward_operators(device):

    net = LeNet().to(device)
    x = torch.rand(3, 1, 28, 28, device=device, requires_grad=True)
    args = lenet_args(x, net)
    opcheck(torch.ops.lenet_ext.lenet_train_forward.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad():
        logits, *activations = torch.ops.lenet_ext.lenet_train_forward(*detached)
    grad_logits = torch.randn_like(logits)
    saved = (grad_logits, detached[0], *activations)
    for mask in ([True] * 11, [False] * 9 + [True, True], [True] + [False] * 10):
        opcheck(torch.ops.lenet_ext.lenet_backward.default, (*saved, *detached[1:], mask))
    ref = d2l_net().to(device)
    ref.load_state_dict(net.state_dict())
    torch.testing.assert_close(logits, ref(x).detach(), **TOLERANCES[torch.float32])
    # Saved activations that do not fit x and the parameters are refused by name.
    bad = list(saved)
    bad[3] = activations[1][:, :399]
    with pytest.raises(ValueError, match=r"expected block2 of shape \[3, 400\]"):
        torch.ops.lenet_ext.lenet_backward(*bad, *detached[1:], [True] * 11)
    bad = list(saved)
    bad[0] = grad_logits[:2]
    with pytest.raises(ValueError, match=r"expected grad_logits of shape \[3, 10\]"):
        torch.ops.lenet_ext.lenet_backward(*bad, *detached[1:], [True] * 11)


@pytest.mark.parametrize("device", DEVICES)
def test_lenet_forward_operator(device):

    net = LeNet().to(device)
    x = torch.rand(3, 1, 28, 28, device=device)
    args = lenet_args(x, net)
    with torch.no_grad():
        opcheck(torch.ops.lenet_ext.lenet_forward.default, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    ref = d2l_net().to(device)
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(torch.ops.lenet_ext.lenet_forward(*args), ref(x), **TOLERANCES[torch.float32])
    bad = list(args)
    bad[LENET_PARAMS.index("fc1_weight") + 1] = torch.randn(120, 399, device=device)
    with torch.no_grad(), pytest.raises(ValueError, match=r"fc1_weight of shape \(out_features, 400\)"):
        torch.ops.lenet_ext.lenet_forward(*bad)


@requires_cuda
@pytest.mark.parametrize("batch", [130, 1030])
def test_cuda_backward_is_not_cut_into_the_cpu_tiles(batch):
    """On CUDA the batch is not cut into the CPU's 64-image tiles: lenet_backward is a handful of
    launches at any batch (tiled like the CPU, 1030 images would take over a hundred)."""
    net = LeNet().cuda()
    x = torch.rand(batch, 1, 28, 28, device="cuda", requires_grad=True)
    loss = net(x).sum()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        loss.backward()
        torch.cuda.synchronize()
    events = prof.key_averages()
    assert sum(e.count for e in events if e.key == "lenet_ext::lenet_backward") == 1
    assert sum(e.count for e in events if e.key == "lenet_ext::conv_sigmoid_avgpool2d_backward") <= 2
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    assert 1 <= launches <= 12, [(e.key, e.count) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]


# --- bad input to the whole-network operators ----------------------------------


def _lenet_bad_inputs():
    """(argument to replace, its bad value, error, message) for lenet_forward's arguments."""
    return {
        "x_3d": ("x", torch.rand(2, 28, 28), ValueError, r"x to be 4-d"),
        "x_32x32": ("x", torch.rand(2, 1, 32, 32), ValueError, r"fc1_weight of shape \(out_features, 576\)"),
        "conv2_channels": ("conv2_weight", torch.randn(16, 5, 5, 5), ValueError, r"channel mismatch"),
        "fc2_weight_dtype": ("fc2_weight", torch.randn(84, 120, dtype=torch.float64), TypeError, r"fc2_weight to have x's dtype"),
        "fc1_bias_size": ("fc1_bias", torch.randn(1), ValueError, r"fc1_bias to be 1-d of size out_features = 120"),
        "fc3_bias_dtype": ("fc3_bias", torch.randn(10, dtype=torch.float64), TypeError, r"fc3_bias to have x's dtype"),
        "pool_zero": ("pool2", 0, ValueError, r"pool >= 1"),
        # Block 2's features, 16 x (2^60 + 5)^2, would wrap around an int64.
        "conv2_padding_past_int64_sizes": ("conv2_padding", 2**61, ValueError, r"at most 2\^56 elements, got padding 2305843009213693952"),
    }


@pytest.mark.parametrize("path", ["lenet_forward", "lenet_train_forward", "lenet_backward", "meta", "fake_mode"])
@pytest.mark.parametrize("case", list(_lenet_bad_inputs().values()), ids=list(_lenet_bad_inputs()))
def test_lenet_operators_refuse_bad_input_alike(case, path):
    """One table through the three operators, their meta kernels and FakeTensorMode: drift fails here."""

    name, value, error, message = case
    net = LeNet()
    args = list(lenet_args(torch.rand(2, 1, 28, 28), net))
    args[(("x",) + LENET_PARAMS).index(name)] = value
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    x, params = args[0], args[1:]
    saved = (torch.zeros(2, 10), x, torch.zeros(2, 6, 14, 14), torch.zeros(2, 400), torch.zeros(2, 120), torch.zeros(2, 84))
    if path == "lenet_backward" and name == "x" and value.dim() == 4:
        message = r"expected block1 of shape"  # a 32x32 x no longer fits the saved activations, checked first
    with pytest.raises(error, match=message):
        if path == "lenet_backward":
            torch.ops.lenet_ext.lenet_backward.default(*saved, *params, [True] * 11)
        elif path == "meta":
            meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
            torch.ops.lenet_ext.lenet_train_forward.default(*meta)
        elif path == "fake_mode":
            with FakeTensorMode() as mode:
                torch.ops.lenet_ext.lenet_forward.default(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        else:
            getattr(torch.ops.lenet_ext, path).default(*args)


# The implementation for devices without one of their own (CUDA's until it has
# a fused one): the whole batch at once. Reached on the CPU by dispatching
# past the CPU kernel.
WHOLE_BATCH = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


@pytest.mark.parametrize("batch", [0, 3, 130])
def test_whole_batch_implementation_matches_the_reference(batch):
    net, ref = twin_pair(torch.float64)
    x = torch.rand(batch, 1, 28, 28, dtype=torch.float64)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in lenet_args(x, net)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = torch.ops.lenet_ext.lenet_forward.default.redispatch(WHOLE_BATCH, *args)
        _, *activations = torch.ops.lenet_ext.lenet_train_forward.default.redispatch(WHOLE_BATCH, *args)
        grad_logits = torch.randn(batch, 10, dtype=torch.float64)
        grads = torch.ops.lenet_ext.lenet_backward.default.redispatch(
            WHOLE_BATCH, grad_logits, x, *activations, *args[1:], [True] * 11
        )
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts["lenet_ext::conv_sigmoid_avgpool2d"] == 4  # each block once, in each forward
    assert counts["lenet_ext::conv_sigmoid_avgpool2d_backward"] == 2
    xs = x.clone().requires_grad_()
    want = ref(xs)
    torch.testing.assert_close(logits, want.detach(), **TOLERANCES[torch.float64])
    want_grads = torch.autograd.grad(want, [xs, *ref.parameters()], grad_logits)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float64])


# Geometries for the small-batch path (random_lenet_args of test_tile_programs.py).
SMALL_BATCH_CONFIGS = {
    "lenet": {},
    "column_layout": dict(size=26),  # conv1's 13 x 13 outputs: the column layout, 16 columns a vector
    "odd_pools": dict(size=13, k1=3, pad1=1, pool1=3, c1=5, k2=2, pad2=1, pool2=1, c2=3, f1=9, f2=7, f3=4),
    "pool1_strips_of_8": dict(size=9, k1=1, pad1=0, pool1=1, c1=2, k2=3, pad2=2, pool2=4, c2=17, f1=5, f2=3, f3=2),
    "rgb_no_bias": dict(in_channels=3, size=32, pad1=0, f3=47, bias=False),
}
GRAD_NAMES = ("x", "conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias", "fc1_weight", "fc1_bias",
              "fc2_weight", "fc2_bias", "fc3_weight", "fc3_bias")  # fmt: skip


@pytest.mark.parametrize("num_threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("batch", [1, 2, 5, 64])
@pytest.mark.parametrize("config", list(SMALL_BATCH_CONFIGS.values()), ids=list(SMALL_BATCH_CONFIGS))
def test_small_batches_shared_image_by_image(config, batch, num_threads):
    """Batches of a few images give each thread whole images, unevenly where they do not divide; for
    training every activation backward reads comes back, as the layer-by-layer path (float64) returns it."""
    args = random_lenet_args(batch, **config)
    with torch.inference_mode():
        torch.testing.assert_close(torch.ops.lenet_ext.lenet_forward(*args), reference(args), atol=2e-5, rtol=2e-4)
        got = torch.ops.lenet_ext.lenet_train_forward(*args)
        want = torch.ops.lenet_ext.lenet_train_forward(*(a.double() if isinstance(a, Tensor) else a for a in args))
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float32 and g.is_contiguous()
        torch.testing.assert_close(g, w.float(), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("num_threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("batch", [1, 2, 5, 47, 64])
@pytest.mark.parametrize("config", list(SMALL_BATCH_CONFIGS.values()), ids=list(SMALL_BATCH_CONFIGS))
def test_small_batch_backward_shared_image_by_image(config, batch, num_threads):
    """lenet_backward of a few images: each thread takes whole images and sums its own parameter
    gradients, added in thread order; every gradient against the layer-by-layer path in float64."""
    args = random_lenet_args(batch, **config)
    inputs = backward_inputs(args)
    mask = [True] * 11
    got = torch.ops.lenet_ext.lenet_backward(*inputs, *args[1:], mask)
    assert_grads_match(got, reference_grads(inputs, args, mask), mask)


@pytest.mark.parametrize("num_threads", [1, 2], indirect=True)
@pytest.mark.parametrize(
    "asked",
    [["x"], ["conv1_weight"], ["conv2_bias"], ["fc1_weight", "fc3_bias"], ["fc2_bias"], ["fc3_weight"],
     ["x", "fc2_weight"], []],
)  # fmt: skip
def test_small_batch_backward_computes_what_is_asked(asked, num_threads):
    """Only the gradients asked for come back, each against the layer-by-layer path in float64:
    the chain stops at the lowest layer asked for."""
    mask = [name in asked for name in GRAD_NAMES]
    args = random_lenet_args(3)
    inputs = backward_inputs(args)
    got = torch.ops.lenet_ext.lenet_backward(*inputs, *args[1:], mask)
    assert [g is not None for g in got] == mask
    assert_grads_match(got, reference_grads(inputs, args, mask), mask)


def test_small_batch_backward_for_models_of_other_sizes_in_turn():
    """The per-thread buffers whose zero borders the kernels rely on are zeroed again when the
    layers change, and kept while they do not: models of other sizes in turn, twice."""
    mask = [True] * 11
    models = [(1, "lenet"), (3, "odd_pools"), (2, "lenet"), (1, "rgb_no_bias")]
    for _ in range(2):
        for batch, name in models:
            args = random_lenet_args(batch, **SMALL_BATCH_CONFIGS[name])
            inputs = backward_inputs(args)
            got = torch.ops.lenet_ext.lenet_backward(*inputs, *args[1:], mask)
            assert_grads_match(got, reference_grads(inputs, args, mask), mask)


@pytest.mark.parametrize("batch", [4, 64])
@pytest.mark.parametrize("op", ["lenet_forward", "lenet_train_forward", "lenet_backward"])
@pytest.mark.parametrize("cpu_kernel", [k for k in CPU_KERNELS if k != "generic"], indirect=True)
def test_small_batches_run_without_a_layer_by_layer_call(op, cpu_kernel, batch):
    """Up to a tile of 64 images both forwards, and the backward, run the five layers in one pass of
    the vectorised kernels: no conv operator and no matrix product is dispatched on the way."""
    x = torch.rand(batch, 1, 28, 28)
    args = [a.detach() if isinstance(a, Tensor) else a for a in lenet_args(x, LeNet())]
    if op == "lenet_backward":
        logits, *saved = torch.ops.lenet_ext.lenet_train_forward(*args)
        args = [torch.randn_like(logits), x, *saved, *args[1:], [True] * 11]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        getattr(torch.ops.lenet_ext, op)(*args)
    names = {e.key for e in prof.key_averages()}
    assert f"lenet_ext::{op}" in names
    layer_calls = {"lenet_ext::conv_sigmoid_avgpool2d", "lenet_ext::conv_sigmoid_avgpool2d_backward", "aten::addmm",
                   "aten::mm", "aten::linear", "aten::sum", "aten::sigmoid_backward"}  # fmt: skip
    assert not names & layer_calls, names
