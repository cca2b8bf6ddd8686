"""LeNet is the d2l nn.Sequential, layer for layer, with fused conv blocks."""

import contextlib
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lenet_ext import LeNet, reference_lenet

from conftest import DEVICES, REFERENCE_TABLE, d2l_net, outputs_and_grads, requires_cuda, twin_pair
from conftest import LENET_TOLERANCES as TOLERANCES
from test_conv_sigmoid_avgpool2d import NON_FINITE

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


def test_export_keeps_the_whole_network_operator():
    net, ref = twin_pair()
    x = torch.rand(4, 1, 28, 28)
    exported = torch.export.export(net.eval(), (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.lenet_ext.lenet_train_forward.default in targets
    y = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(y), ref(y), **TOLERANCES[torch.float32])


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


def _check_a_non_finite_pixel(value, batch, device):
    """A pixel of value in image 0 reaches the logits and every gradient as in the reference: an
    infinite one saturates the units it reaches, whose zero derivative times it is NaN."""
    net, ref = twin_pair(device=device)
    x = torch.rand(batch, 1, 28, 28, device=device)
    x[0, 0, 9, 12] = value
    target = torch.randint(0, 10, (batch,), device=device)
    got, want = outputs_and_grads(net, x, target), outputs_and_grads(ref, x, target)
    for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        torch.testing.assert_close(g, w, equal_nan=True, **TOLERANCES[torch.float32])


@NON_FINITE
@pytest.mark.parametrize("batch", [1, 70])  # the small-batch path, and tiles of 64
def test_a_non_finite_pixel_on_every_cpu_kernel(value, batch, cpu_kernel):
    _check_a_non_finite_pixel(value, batch, "cpu")


@requires_cuda
@NON_FINITE
def test_a_non_finite_pixel_on_cuda(value):
    _check_a_non_finite_pixel(value, 70, "cuda")


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


def test_compiled_lenet_is_the_whole_network_operator_until_a_layer_changes():
    """torch.compile traces the operator call, not the layers, and guards on what LeNet decided
    it from: a forward patched onto a layer recompiles into the layers."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    net, ref = twin_pair()
    compiled = torch.compile(net, backend=recording_backend, fullgraph=True)
    x = torch.rand(4, 1, 28, 28)
    compiled(x)
    with torch.inference_mode():
        compiled(x)
    assert ["lenet_ext.lenet_train_forward.default" in g for g in graphs] == [True, False]
    assert ["lenet_ext.lenet_forward.default" in g for g in graphs] == [False, True]
    for model in (net, ref):
        model[1].forward = torch.tanh
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), ref(x), **TOLERANCES[torch.float32])
    assert len(graphs) == 3 and not any(op.startswith("lenet_ext.lenet") for op in graphs[2])


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


@pytest.mark.parametrize(
    "shape, hint",
    [((2, 1, 32, 32), ""), ((2, 28, 28), "batch dimension"), ((2, 3, 28, 28), ""), ((1, 1, 20, 20), "")],
    ids=["32x32", "no_channel_dim", "3_channels", "too_small"],
)
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_input_of_the_wrong_shape_is_named(shape, hint, mode):
    """The user is told what LeNet expects and what it got, not which weight of an internal operator failed."""
    net = LeNet()
    context = torch.inference_mode() if mode == "inference" else contextlib.nullcontext()
    with context, pytest.raises(ValueError, match=r"expects input of shape \(N, 1, 28, 28\)") as info:
        net(torch.rand(shape))
    assert str(tuple(shape)) in str(info.value) and hint in str(info.value)
    assert "lenet_train_forward" not in str(info.value) and "lenet_forward" not in str(info.value)


def test_input_error_follows_the_configuration():
    net = LeNet(in_channels=3, image_size=32)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3, 32, 32\)"):
        net(torch.rand(2, 1, 28, 28))
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# --- what the small-batch inference path and the layout cache must see -----
# At batch 1 LeNet reuses what it decided at the previous call (csrc/ops/cpu/
# lenet_small_batch.cpp keeps packed conv weights, model.py the layers'
# layout): every change below is made after a first call.


def _check_against_reference(net, ref, batch=1):
    x = torch.rand(batch, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), ref(x), **TOLERANCES[torch.float32])


def _same_to_both(edit):
    """A change made the same way to LeNet and to the reference, then the reference's parameters made equal."""

    def change(net, ref):
        edit(net)
        edit(ref)
        ref.load_state_dict(net.state_dict())

    return change


def _hook_doubling_fc2(model):
    model[10].register_forward_hook(lambda m, i, o: o * 2)


def _swap_conv1_weight(model):
    model[0].weight = nn.Parameter(torch.randn(6, 1, 5, 5))


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _parametrize_conv2_weight(model):
    # register_parametrization changes the layer's class and moves its weight out of _parameters.
    nn.utils.parametrize.register_parametrization(model[3], "weight", _Doubled())


def _fc1_weight_as_plain_tensor(net, ref):
    weight = torch.randn(120, 400) / 20
    for model in (net, ref):
        del model[7].weight  # out of _parameters; a plain attribute from here on
        model[7].weight = weight


CHANGES_AFTER_A_CALL = {
    # In place, and through .data: no version counter moves.
    "weight_data_in_place": lambda net, ref: [m[3].weight.data.mul_(0.5) for m in (net, ref)],
    "bias_data_in_place": lambda net, ref: [m[0].bias.data.fill_(1.0) for m in (net, ref)],
    "init_in_place": _same_to_both(lambda m: nn.init.normal_(m[3].weight)),
    "load_state_dict": lambda net, ref: [m.load_state_dict(LeNet().state_dict()) for m in (ref,)]
    and net.load_state_dict(ref.state_dict()),
    "parameter_swapped": _same_to_both(_swap_conv1_weight),
    "parametrized": _same_to_both(_parametrize_conv2_weight),
    "weight_as_plain_tensor": _fc1_weight_as_plain_tensor,
    "padding_equal_but_new": lambda net, ref: [setattr(m[0], "padding", (2, 2)) for m in (net, ref)],
    "bias_removed": lambda net, ref: [setattr(m[3], "bias", None) for m in (net, ref)],
    "layer_replaced": _same_to_both(lambda m: m.__setitem__(9, nn.Linear(120, 84))),
    # Same shapes, other values: only the layer path computes these.
    "padding_mode": lambda net, ref: [setattr(m[0], "padding_mode", "reflect") for m in (net, ref)],
    "pool_divisor": lambda net, ref: [setattr(m[5], "divisor_override", 3) for m in (net, ref)],
    "padding_same": lambda net, ref: [setattr(m[0], "padding", "same") for m in (net, ref)],
    "hook_added": lambda net, ref: [_hook_doubling_fc2(m) for m in (net, ref)],
    # A forward set on the instance, as patching or a wrapping tool does: calls run it.
    "conv_forward_patched": _same_to_both(lambda m: setattr(m[3], "forward", lambda x: nn.Conv2d.forward(m[3], x) + 1)),
    "sigmoid_forward_patched": _same_to_both(lambda m: setattr(m[1], "forward", torch.tanh)),
    "linear_forward_patched": _same_to_both(lambda m: setattr(m[11], "forward", lambda x: nn.Linear.forward(m[11], x) * 2)),
}


@pytest.mark.parametrize("change", list(CHANGES_AFTER_A_CALL.values()), ids=list(CHANGES_AFTER_A_CALL))
def test_changes_after_a_call_are_honoured_at_batch_1(change):
    net, ref = twin_pair()
    _check_against_reference(net, ref)
    with torch.no_grad():
        change(net, ref)
    _check_against_reference(net, ref)
    _check_against_reference(net, ref, batch=3)


def test_global_hook_added_after_a_call_is_honoured():
    net, ref = twin_pair()
    _check_against_reference(net, ref)
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: o * 2 if isinstance(m, nn.Linear) else None
    )
    try:
        _check_against_reference(net, ref)
    finally:
        handle.remove()
    with torch.inference_mode(), AtenOpRecorder() as recorder:
        net(torch.rand(1, 1, 28, 28))
    assert "lenet_ext.lenet_forward" in recorder.ops


def test_hook_removed_after_a_call_returns_to_the_operator():
    net, ref = twin_pair()
    handle = net[4].register_forward_hook(lambda m, i, o: None)
    _check_against_reference(net, ref)
    handle.remove()
    with torch.inference_mode(), AtenOpRecorder() as recorder:
        net(torch.rand(1, 1, 28, 28))
    assert "lenet_ext.lenet_forward" in recorder.ops


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 64, 65])
def test_models_called_in_turn_keep_their_own_weights(batch):
    """Two models alternating on one thread, and on another thread, around the small-batch limit."""
    pairs = [twin_pair(seed=seed) for seed in (0, 1)]
    for _ in range(2):
        for net, ref in pairs:
            _check_against_reference(net, ref, batch)
    errors = []

    def other_thread():
        try:
            for net, ref in reversed(pairs):
                _check_against_reference(net, ref, batch)
        except AssertionError as e:
            errors.append(e)

    import threading

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert not errors


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_small_batches_on_other_thread_counts(threads, batch):
    """One thread, and more threads than images share out (the small-batch path splits images or rows)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_against_reference(*twin_pair(), batch=batch)
    finally:
        torch.set_num_threads(before)


def test_models_of_other_sizes_in_turn_at_batch_1():
    """Buffers sized and zeroed for one model's layers must not leak into another's."""
    models = []
    for kwargs in (dict(), dict(image_size=32), dict(in_channels=3, num_classes=5), dict()):
        net = LeNet(**kwargs).eval()
        ref = reference_lenet(**kwargs)
        ref.load_state_dict(net.state_dict())
        side = kwargs.get("image_size", 28)
        models.append((net, ref, (1, kwargs.get("in_channels", 1), side, side)))
    for _ in range(2):
        for net, ref, shape in models:
            x = torch.rand(*shape)
            with torch.inference_mode():
                torch.testing.assert_close(net(x), ref(x), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("make", [LeNet, lambda: __import__("lenet_ext").fuse(reference_lenet())], ids=["LeNet", "fuse"])
def test_torch_func_per_sample_gradients(make):
    """torch.func's transforms cannot run the operators' autograd kernels: under them the plain layers run,
    so vmap(grad(...)) over functional_call gives what it gives for the reference."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    net = make().double()
    ref = reference_lenet().double()
    ref.load_state_dict(net.state_dict())
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, yi):
            return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, want = per_sample(net), per_sample(ref)
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k])
    # Outside the transforms, the same model is fused again.
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), **TOLERANCES[torch.float64])


def test_unchanged_compares_by_identity_and_names_bad_arguments():
    from lenet_ext import _C

    where = {"a": (1, 1)}
    assert _C.unchanged((where, dict), (where, "a", where["a"]), ({},), (where, "b"))
    assert not _C.unchanged((where, list), (), (), ())
    assert not _C.unchanged((), (where, "a", tuple([1, 1])), (), ())  # equal but another object
    assert not _C.unchanged((), (where, "b", None), (), ())  # a missing key is not None
    assert not _C.unchanged((), (), ({"hook": None},), ())
    assert not _C.unchanged((), (), (), (where, "a"))
    with pytest.raises(TypeError, match="four tuples"):
        _C.unchanged([], (), (), ())
    with pytest.raises(ValueError, match="pairs"):
        _C.unchanged((where,), (), (), ())
    with pytest.raises(ValueError, match="pairs"):
        _C.unchanged((), (), (), (where,))
    with pytest.raises(TypeError, match="dict"):
        _C.unchanged((), ([], "a", 1), (), ())
    with pytest.raises(TypeError, match="dict"):
        _C.unchanged((), (), (), ([], "a"))
