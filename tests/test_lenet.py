"""LeNet is the d2l nn.Sequential, layer for layer, with fused conv blocks."""

import contextlib
import io
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lenet_ext
from lenet_ext import LeNet, reference_lenet
from lenet_ext.model import lenet_args
from lenet_ext.ops import LENET_PARAMS

from conftest import DEVICES, requires_cuda

# The chapter's table, as its loop prints it.
REFERENCE_TABLE = """\
Conv2d output shape: \t torch.Size([1, 6, 28, 28])
Sigmoid output shape: \t torch.Size([1, 6, 28, 28])
AvgPool2d output shape: \t torch.Size([1, 6, 14, 14])
Conv2d output shape: \t torch.Size([1, 16, 10, 10])
Sigmoid output shape: \t torch.Size([1, 16, 10, 10])
AvgPool2d output shape: \t torch.Size([1, 16, 5, 5])
Flatten output shape: \t torch.Size([1, 400])
Linear output shape: \t torch.Size([1, 120])
Sigmoid output shape: \t torch.Size([1, 120])
Linear output shape: \t torch.Size([1, 84])
Sigmoid output shape: \t torch.Size([1, 84])
Linear output shape: \t torch.Size([1, 10])
"""

TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
}


def d2l_net():
    """The chapter's model, written out as the chapter writes it."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10))  # fmt: skip


def twin_pair(dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    net = LeNet().to(dtype=dtype, device=device)
    ref = d2l_net().to(dtype=dtype, device=device)
    ref.load_state_dict(net.state_dict())
    return net, ref


def outputs_and_grads(model, x, target):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    nn.functional.cross_entropy(out, target).backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


def test_children_are_the_reference_layers():
    net, ref = LeNet(), d2l_net()
    assert len(net) == len(ref) == 12
    assert isinstance(net, nn.Sequential)
    for mine, theirs in zip(net, ref):
        assert type(mine) is type(theirs)
        assert repr(mine) == repr(theirs)
    assert [type(net[i]) for i in range(12)] == [type(m) for m in ref]
    assert type(net[-1]) is nn.Linear and isinstance(net[0:3], nn.Sequential)
    assert str(net).splitlines()[1:] == str(ref).splitlines()[1:]


def test_state_dict_round_trips_with_the_reference():
    net, ref = LeNet(), d2l_net()
    mine, theirs = net.state_dict(), ref.state_dict()
    assert list(mine) == list(theirs)
    assert all(mine[k].shape == theirs[k].shape for k in mine)
    ref.load_state_dict(mine, strict=True)
    fresh = LeNet()
    fresh.load_state_dict(ref.state_dict(), strict=True)
    for a, b in zip(fresh.state_dict().values(), mine.values()):
        assert torch.equal(a, b)


def test_d2l_init_weights_reaches_every_weight():
    net = LeNet()
    seen = []

    def init_weights(m):
        if type(m) == nn.Linear or type(m) == nn.Conv2d:  # noqa: E721  (as d2l writes it)
            nn.init.constant_(m.weight, 0.5)
            seen.append(m)

    net.apply(init_weights)
    assert len(seen) == 5
    assert all(torch.all(m.weight == 0.5) for m in seen)


def test_reference_loop_prints_the_reference_table():
    net = LeNet()
    X = torch.rand(size=(1, 1, 28, 28), dtype=torch.float32)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        for layer in net:
            X = layer(X)
            print(layer.__class__.__name__, "output shape: \t", X.shape)
    assert buffer.getvalue() == REFERENCE_TABLE


class AtenOpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def aten_conv_or_pool(ops):
    return [op for op in ops if ("conv" in op or "pool" in op) and not op.startswith("lenet_ext")]


def test_training_is_one_operator_call_each_way():
    net = LeNet()
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    with AtenOpRecorder() as recorder:
        net(x).sum().backward()
    assert recorder.ops.count("lenet_ext.lenet_train_forward") == 1
    assert recorder.ops.count("lenet_ext.lenet_backward") == 1
    assert not aten_conv_or_pool(recorder.ops)


def test_layer_path_runs_the_fused_conv_blocks():
    net = LeNet()
    net[8].register_forward_hook(lambda m, i, o: None)  # a hook: the layers must run one by one
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    with AtenOpRecorder() as recorder:
        net(x).sum().backward()
    assert recorder.ops.count("lenet_ext.conv_sigmoid_avgpool2d") == 2
    assert recorder.ops.count("lenet_ext.conv_sigmoid_avgpool2d_backward") == 2
    assert "lenet_ext.lenet_train_forward" not in recorder.ops
    assert not aten_conv_or_pool(recorder.ops)
    assert net.fused_runs() == [(0, 3), (3, 6)]


def test_inference_is_one_operator_call():
    net = LeNet().eval()
    with torch.inference_mode(), AtenOpRecorder() as recorder:
        net(torch.rand(2, 1, 28, 28))
    assert "lenet_ext.lenet_forward" in recorder.ops
    assert not aten_conv_or_pool(recorder.ops)


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
@pytest.mark.parametrize("batch", [3, 130])
@pytest.mark.parametrize(
    "frozen", [(), (0, 1, 3, 4, 7, 8), (9, 10, 11), tuple(range(12))], ids=["none", "convs-fc1", "fc2-fc3", "all"]
)
def test_training_with_frozen_layers_and_no_bias(frozen, batch, device):
    """Gradients only for what requires them; a Linear without bias gets none for it."""
    net, ref = twin_pair(torch.float64, device)
    net[9].bias = ref[9].bias = None
    for model in (net, ref):
        for i in frozen:
            for p in model[i].parameters():
                p.requires_grad_(False)
    x = torch.rand(batch, 1, 28, 28, dtype=torch.float64, device=device)
    target = torch.randint(0, 10, (batch,), device=device)
    x_needs_grad = frozen == tuple(range(12))  # with every layer frozen, only x asks for a gradient
    got, want = [], []
    for model, result in ((net, got), (ref, want)):
        xi = x.clone().requires_grad_(x_needs_grad)
        with AtenOpRecorder() as recorder:
            out = model(xi)
            nn.functional.cross_entropy(out, target).backward()
        result += [out.detach(), xi.grad] + [p.grad for p in model.parameters()]
        if model is net:
            assert recorder.ops.count("lenet_ext.lenet_backward") == 1
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, **TOLERANCES[torch.float64])
    assert [p.grad is None for p in net.parameters()] == [not p.requires_grad for p in net.parameters()]


@pytest.mark.parametrize("device", DEVICES)
def test_lenet_train_forward_and_backward_operators(device):
    from torch.library import opcheck

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


def test_export_keeps_the_whole_network_operator():
    net = LeNet().eval()
    x = torch.rand(4, 1, 28, 28)
    exported = torch.export.export(net, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.lenet_ext.lenet_train_forward.default in targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), net(x), **TOLERANCES[torch.float32])


def test_inference_with_a_hook_or_an_edited_layer_takes_the_layer_path():
    net, ref = twin_pair(torch.float64)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    seen = []
    handle = net[8].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad(), AtenOpRecorder() as recorder:
        out = net(x)
    handle.remove()
    assert seen == [torch.Size([2, 120])] and "lenet_ext.lenet_forward" not in recorder.ops
    torch.testing.assert_close(out, ref(x).detach(), **TOLERANCES[torch.float64])
    net[10] = ref[10] = nn.Tanh()
    with torch.no_grad(), AtenOpRecorder() as recorder:
        out = net(x)
    assert "lenet_ext.lenet_forward" not in recorder.ops
    torch.testing.assert_close(out, ref(x).detach(), **TOLERANCES[torch.float64])


def test_inference_with_padding_written_as_a_string():
    net, ref = twin_pair(torch.float64)
    net[3].padding = ref[3].padding = "valid"
    net[2].kernel_size = ref[2].kernel_size = (2, 2)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad(), AtenOpRecorder() as recorder:
        out = net(x)
    assert "lenet_ext.lenet_forward" in recorder.ops
    torch.testing.assert_close(out, ref(x), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_lenet_forward_operator(device):
    from torch.library import opcheck

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_and_gradients_match_the_reference(mode, dtype, device):
    net, ref = twin_pair(dtype, device)
    getattr(net, mode)(), getattr(ref, mode)()
    x = torch.rand(5, 1, 28, 28, dtype=dtype, device=device)
    target = torch.randint(0, 10, (5,), device=device)
    out, grad_x, grads = outputs_and_grads(net, x, target)
    ref_out, ref_grad_x, ref_grads = outputs_and_grads(ref, x, target)
    torch.testing.assert_close(out, ref_out, **TOLERANCES[dtype])
    torch.testing.assert_close(grad_x, ref_grad_x, **TOLERANCES[dtype])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_without_autograd(context, device):
    net, ref = twin_pair(torch.float64, device)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, device=device)
    with getattr(torch, context)():
        out = net(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref(x).detach(), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    net, ref = twin_pair(torch.float32, device)
    compiled = torch.compile(net, fullgraph=True)
    x = torch.rand(4, 1, 28, 28, device=device)
    target = torch.randint(0, 10, (4,), device=device)
    out, grad_x, grads = outputs_and_grads(compiled, x, target)
    ref_out, ref_grad_x, ref_grads = outputs_and_grads(ref, x, target)
    torch.testing.assert_close(out, ref_out, **TOLERANCES[torch.float32])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    with torch.inference_mode():  # the whole-network operator, traced
        torch.testing.assert_close(compiled(x), ref(x), **TOLERANCES[torch.float32])


def test_to_dtype_and_load_state_dict_keep_matching():
    net, ref = LeNet(), d2l_net()
    net.to(torch.float64)
    ref.to(torch.float64)
    torch.manual_seed(3)
    ref.apply(lambda m: nn.init.normal_(m.weight) if isinstance(m, (nn.Linear, nn.Conv2d)) else None)
    net.load_state_dict(ref.state_dict())
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(net(x), ref(x), **TOLERANCES[torch.float64])


@pytest.mark.parametrize(
    "kwargs, input_shape, out_features",
    [
        (dict(num_classes=47), (2, 1, 28, 28), 47),
        (dict(in_channels=3), (2, 3, 28, 28), 10),
        (dict(image_size=32), (2, 1, 32, 32), 10),
    ],
)
def test_family_options(kwargs, input_shape, out_features):
    net = LeNet(**kwargs)
    ref = reference_lenet(**kwargs)
    ref.load_state_dict(net.state_dict())
    x = torch.rand(input_shape)
    out = net(x)
    assert out.shape == (2, out_features)
    assert net[7].in_features == 400
    torch.testing.assert_close(out, ref(x), **TOLERANCES[torch.float32])
    if "image_size" in kwargs:
        assert net[0].padding == (0, 0)


def test_bad_options():
    with pytest.raises(ValueError, match="image_size must be 28"):
        LeNet(image_size=30)
    with pytest.raises(ValueError, match="num_classes"):
        LeNet(num_classes=0)


def test_edited_layers_are_honoured():
    net, ref = twin_pair(torch.float64)
    net[1] = nn.ReLU()
    ref[1] = nn.ReLU()
    net[3].stride = (2, 2)
    ref[3].stride = (2, 2)
    net[7] = nn.Linear(64, 120, dtype=torch.float64)
    ref[7] = net[7]
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(net(x), ref(x))
    assert net.fused_runs() == []


def test_layer_attributes_changed_after_a_forward_are_honoured():
    net, ref = twin_pair(torch.float64)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    net(x)
    net[3].stride = ref[3].stride = (2, 2)
    net[7] = ref[7] = nn.Linear(64, 120, dtype=torch.float64)
    torch.testing.assert_close(net(x), ref(x))
    assert net.fused_runs() == [(0, 3)]
    # An attribute change alone keeps the plan; the block checks it at call time.
    net[2].ceil_mode = True
    with AtenOpRecorder() as recorder:
        net(x)
    assert "lenet_ext.conv_sigmoid_avgpool2d" not in recorder.ops
    assert net.fused_runs() == []


def test_forward_hooks_on_a_fused_layer_still_fire():
    net = LeNet()
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    net(torch.rand(1, 1, 28, 28))
    assert seen == [torch.Size([1, 6, 28, 28])]


def test_unsupported_dtype_falls_back_to_the_modules():
    net, ref = twin_pair(torch.bfloat16)
    x = torch.rand(2, 1, 28, 28, dtype=torch.bfloat16)
    torch.testing.assert_close(net(x), ref(x))


# --- fuse -------------------------------------------------------------------


def test_fuse_shares_parameters_and_fuses_the_conv_blocks():
    model = d2l_net()
    fused = lenet_ext.fuse(model)
    assert fused.fused_runs() == [(0, 3), (3, 6)]
    assert "fused_runs=[(0, 3), (3, 6)]" in repr(fused)
    for a, b in zip(fused.parameters(), model.parameters()):
        assert a is b
    x = torch.rand(8, 1, 28, 28)
    target = torch.randint(0, 10, (8,))
    before = model(x).detach()
    torch.testing.assert_close(fused(x), before, **TOLERANCES[torch.float32])
    # Training the fused model trains the original.
    opt = torch.optim.SGD(fused.parameters(), lr=0.5)
    nn.functional.cross_entropy(fused(x), target).backward()
    opt.step()
    assert not torch.allclose(model(x), before)
    torch.testing.assert_close(fused(x), model(x), **TOLERANCES[torch.float32])


def test_fuse_leaves_other_layers_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(), nn.AvgPool2d(2),          # fused
        nn.Conv2d(4, 4, 3, stride=2), nn.Sigmoid(), nn.AvgPool2d(2),           # stride 2: not fused
        nn.Conv2d(4, 5, 1, bias=False), nn.Sigmoid(), nn.AvgPool2d(3, 3),      # fused, no bias, pool 3
        nn.Sequential(nn.Conv2d(5, 5, 1), nn.Sigmoid(), nn.AvgPool2d(1)),      # nested: fused
        nn.Conv2d(5, 5, 1), nn.ReLU(), nn.AvgPool2d(1),                        # ReLU: not fused
        nn.Conv2d(5, 5, 1), nn.Sigmoid(), nn.AvgPool2d(1, ceil_mode=True),     # ceil_mode: not fused
        nn.Flatten(), nn.Linear(5, 3),
    ).double()  # fmt: skip
    fused = lenet_ext.fuse(model)
    assert fused.fused_runs() == [(0, 3), (6, 9)]
    assert fused[9].fused_runs() == [(0, 3)]
    x = torch.rand(2, 3, 40, 40, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fused(x), model(x))
    (g_fused,) = torch.autograd.grad(fused(x).sum(), x)
    (g_model,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(g_fused, g_model)


def test_fuse_keeps_the_state_dict_and_mode():
    model = d2l_net().eval()
    fused = lenet_ext.fuse(model)
    assert not fused.training
    assert list(fused.state_dict()) == list(model.state_dict())


def test_fuse_returns_non_sequential_modules_unchanged():
    conv = nn.Conv2d(1, 1, 3)
    assert lenet_ext.fuse(conv) is conv


# --- shapes -----------------------------------------------------------------


def test_get_output_size_reproduces_the_chapter():
    assert lenet_ext.get_output_size((28, 28), (5, 5), (2 * 2, 2 * 2), (1, 1)) == (28, 28)
    assert lenet_ext.get_output_size((28, 28), (2, 2), (0, 0), (2, 2)) == (14, 14)
    assert lenet_ext.get_output_size(14, 5, 0, 1) == (10, 10)
    assert lenet_ext.get_output_size((11, 9), (2, 2), (0, 0), (2, 2)) == (5, 4)


def test_get_output_size_rejects_bad_sizes():
    with pytest.raises(ValueError, match="slide_size >= 1"):
        lenet_ext.get_output_size((28, 28), (5, 5), (0, 0), (0, 1))
    with pytest.raises(ValueError, match="does not fit"):
        lenet_ext.get_output_size((3, 3), (5, 5), (0, 0), (1, 1))
    with pytest.raises(TypeError, match="kernel_size"):
        lenet_ext.get_output_size((28, 28), "5", (0, 0), (1, 1))


def test_summary_prints_the_table_with_parameter_counts():
    lines = []
    total = lenet_ext.summary(LeNet(), print_fn=lines.append)
    assert total == sum(p.numel() for p in d2l_net().parameters()) == 61706
    table = [line.split("\t params: ")[0] for line in lines[:-1]]
    assert "\n".join(table) + "\n" == REFERENCE_TABLE
    assert lines[0].endswith("params: 156") and lines[7].endswith("params: 48120")
    assert lines[-1] == "Total params: 61706"


def test_summary_command():
    out = subprocess.run(
        [sys.executable, "-m", "lenet_ext", "summary"], capture_output=True, text=True, check=True
    ).stdout
    assert "Conv2d output shape: \t torch.Size([1, 6, 28, 28])" in out
    assert "Total params: 61706" in out


# --- edge cases and second order ----------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_empty_batch_gives_zero_gradients(dtype, device):
    """A batch of 0 images: empty logits and all-zero gradients, as nn.Sequential gives."""
    net, ref = twin_pair(dtype, device)
    x = torch.randn(0, 1, 28, 28, dtype=dtype, device=device)
    for model in (net, ref):
        out = model(x)
        assert out.shape == (0, 10)
        out.sum().backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad) and not p.grad.any()


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_penalty_matches_the_reference(device):
    """Double backward through the whole-network operator: d/dparams of |d loss/dx|^2."""
    net, ref = twin_pair(torch.float64, device)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, device=device)
    target = torch.randint(0, 10, (3,), device=device)
    grads = []
    for model in (net, ref):
        xs = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(nn.functional.cross_entropy(model(xs), target), xs, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), list(model.parameters())))
    assert grads[1][0].abs().max() > 0
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


@requires_cuda
def test_cuda_backward_runs_each_conv_block_once():
    """On CUDA the batch is not cut into the CPU's 64-image tiles: one conv backward per block."""
    net = LeNet().cuda()
    x = torch.rand(130, 1, 28, 28, device="cuda", requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        net(x).sum().backward()
    calls = [e.count for e in prof.key_averages() if e.key == "lenet_ext::conv_sigmoid_avgpool2d_backward"]
    assert calls == [2]


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
    }


@pytest.mark.parametrize("path", ["lenet_forward", "lenet_train_forward", "lenet_backward", "meta", "fake_mode"])
@pytest.mark.parametrize("case", list(_lenet_bad_inputs().values()), ids=list(_lenet_bad_inputs()))
def test_lenet_operators_refuse_bad_input_alike(case, path):
    """One table through the three operators, their meta kernels and FakeTensorMode: drift fails here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

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
