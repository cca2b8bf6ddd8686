"""The fused operator against the PyTorch composite, computed in float64."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import lenet_ext
from lenet_ext.ops import conv_sigmoid_avgpool2d

from conftest import CPU_KERNELS, DEVICES, requires_cuda

OP = torch.ops.lenet_ext.conv_sigmoid_avgpool2d.default
BACKWARD_OP = torch.ops.lenet_ext.conv_sigmoid_avgpool2d_backward.default

# (batch, in_channels, out_channels, height, width, kernel, padding, pool)
CASES = {
    "lenet_layer1": (3, 1, 6, 28, 28, 5, 2, 2),
    "lenet_layer2": (3, 6, 16, 14, 14, 5, 0, 2),
    "batch0": (0, 1, 6, 28, 28, 5, 2, 2),
    "batch1": (1, 6, 16, 14, 14, 5, 0, 2),
    "rgb_5_out": (3, 3, 5, 12, 12, 3, 1, 2),
    "kernel1": (2, 3, 4, 7, 7, 1, 0, 2),
    "kernel7_padded": (2, 2, 3, 9, 9, 7, 3, 2),
    "pool_floors": (2, 2, 3, 13, 11, 3, 0, 2),  # conv 11x9 -> pool 5x4, last row and column dropped
    "pool1": (2, 2, 3, 8, 8, 3, 1, 1),
    "pool3_floors": (3, 1, 5, 12, 10, 3, 1, 3),  # conv 12x10 -> 4x3, one column dropped
    "non_square": (2, 3, 2, 6, 15, 3, 2, 2),
    "kernel_fills_input": (2, 2, 3, 5, 5, 5, 0, 1),
    # LeNet's kernel size has its own compiled loops; odd shapes for both vector layouts.
    "kernel5_columns_floors": (2, 2, 3, 15, 13, 5, 1, 2),  # conv 13x11 -> pool 6x5, pooled-column lanes
    "kernel5_20_channels": (2, 3, 20, 11, 9, 5, 2, 2),  # two channel blocks, the second partial
    # Rows of x past 32 columns with an odd padding: x's even columns land in xp's odd half.
    "kernel5_columns_wide_odd_padding": (2, 1, 3, 9, 45, 5, 3, 2),
    # Channel lanes compute the input gradient for groups of 16 images: two
    # whole groups and a partial one, two blocks of input channels.
    "image_groups": (37, 8, 20, 9, 9, 5, 1, 2),
    "image_groups_pool3": (18, 3, 17, 10, 10, 3, 2, 3),
    # Rows of whole quads of four floats, which the CUDA programs stage a quad at a
    # time: padding 4 (whole quads of zeros), and padding 2 over several channels.
    "row_quads_padding4": (3, 2, 3, 7, 12, 3, 4, 2),
    "row_quads_padding2": (2, 3, 4, 5, 8, 5, 2, 2),
}

# Tolerances against the float64 reference. float32 accumulates in float32:
# sums of up to C_in * K * K products in forward, and batch * H * W products
# in the weight gradient.
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
}


def reference(x, weight, bias, padding, pool):
    return F.avg_pool2d(torch.sigmoid(F.conv2d(x, weight, bias, padding=padding)), pool, pool)


def make_inputs(case, dtype, device, with_bias=True, seed=0):
    n, c_in, c_out, h, w, k, padding, pool = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64) / k
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64) if with_bias else None
    to = dict(dtype=dtype, device=device)
    return x.to(**to), weight.to(**to), None if bias is None else bias.to(**to), padding, pool


def grads_of(fn, tensors, grad_out):
    leaves = [t.detach().requires_grad_() for t in tensors if t is not None]
    it = iter(leaves)
    args = [None if t is None else next(it) for t in tensors]
    out = fn(*args)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward_and_gradients_match_reference(case, with_bias, dtype, device):
    x, weight, bias, padding, pool = make_inputs(case, dtype, device, with_bias)
    n, _, c_out, h, w, k, _, _ = case
    out_shape = (n, c_out, (h + 2 * padding - k + 1) // pool, (w + 2 * padding - k + 1) // pool)
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    tensors = (x, weight, bias)
    out, grads = grads_of(lambda *t: conv_sigmoid_avgpool2d(*t, padding, pool), tensors, grad_out.to(x))
    ref_tensors = tuple(None if t is None else t.double().cpu() for t in tensors)
    ref_out, ref_grads = grads_of(lambda *t: reference(*t, padding, pool), ref_tensors, grad_out)

    assert out.shape == out_shape and out.dtype == dtype and out.device == x.device
    torch.testing.assert_close(out.double().cpu(), ref_out, **TOLERANCES[dtype])
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), want, **TOLERANCES[dtype])


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_every_cpu_kernel_matches_reference(case, with_bias, cpu_kernel):
    """float32 on each CPU kernel: the generic one (the CUDA arithmetic) and each vectorised build."""
    assert lenet_ext._C.cpu_kernel() == cpu_kernel
    test_forward_and_gradients_match_reference(case, with_bias, torch.float32, "cpu")


@pytest.mark.parametrize("out_channels, width", [(16, 4), (6, 28)], ids=["channel_lanes", "column_lanes"])
def test_every_cpu_kernel_passes_nan_and_inf_through_the_sigmoid(out_channels, width, cpu_kernel):
    """NaN stays NaN, +-inf and far-out values saturate, as in torch.sigmoid; in both vector layouts."""
    x = torch.zeros(1, 1, 4, width)
    x[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 200.0])
    x[0, 0, 2, :4] = torch.tensor([-200.0, 90.0, -90.0, 1.0])
    weight = torch.ones(out_channels, 1, 1, 1)
    got = conv_sigmoid_avgpool2d(x, weight, None, 0, 2)
    want = F.avg_pool2d(torch.sigmoid(F.conv2d(x.double(), weight.double())), 2)
    torch.testing.assert_close(got.double(), want, equal_nan=True, **TOLERANCES[torch.float32])
    assert got[0, :, 0, 0].isnan().all() and not got[0, :, 0, 1:].isnan().any()


def non_finite_pixel_grads(op, value, batch, out_channels, width, device="cpu"):
    """op's output and gradients, with one pixel of value, for a conv block of 3 input channels, kernel 5, padding 1."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, width, width, generator=gen)
    x[0, 1, 5, 6] = value
    weight, bias = torch.randn(out_channels, 3, 5, 5, generator=gen), torch.randn(out_channels, generator=gen)
    grad_out = torch.randn(batch, out_channels, (width - 2) // 2, (width - 2) // 2, generator=gen)
    inputs = [t.to(device).requires_grad_() for t in (x, weight, bias)]
    out = op(*inputs, 1, 2)
    return (out.detach(), *torch.autograd.grad(out, inputs, grad_out.to(device)))


NON_FINITE = pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=["inf", "minus_inf", "nan"])
# LeNet's blocks: 16 channels, a whole number of groups and vectors, and 6, which are not.
NON_FINITE_LAYOUTS = pytest.mark.parametrize("out_channels, width", [(16, 14), (6, 28)], ids=["channel_lanes", "column_lanes"])


def check_non_finite_pixel(value, batch, out_channels, width, device):
    """An infinite pixel saturates the units it reaches, whose zero derivative times it is NaN in
    every weight gradient, as in torch's backward, and nowhere else; a NaN spreads alike. A
    saturated unit's dL/dz must be exactly 0 for that, and padding lanes of zero weights must not
    carry NaN. torch's float32 reference runs on the CPU: on CUDA, cuDNN may run it in TF32."""
    got = non_finite_pixel_grads(conv_sigmoid_avgpool2d, value, batch, out_channels, width, device)
    want = non_finite_pixel_grads(reference, value, batch, out_channels, width, "cpu")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, equal_nan=True, **TOLERANCES[torch.float32])


@NON_FINITE
@NON_FINITE_LAYOUTS
@pytest.mark.parametrize("batch", [1, 17])
def test_every_cpu_kernel_meets_a_non_finite_pixel_as_torch(batch, out_channels, width, value, cpu_kernel):
    check_non_finite_pixel(value, batch, out_channels, width, "cpu")


@requires_cuda
@NON_FINITE
@NON_FINITE_LAYOUTS
def test_cuda_meets_a_non_finite_pixel_as_torch(out_channels, width, value):
    check_non_finite_pixel(value, 17, out_channels, width, "cuda")


def _cpu_kernel_in_a_new_process(env):
    code = "import lenet_ext; print(lenet_ext._C.cpu_kernel())"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


def test_cpu_kernel_choice_is_validated():
    with pytest.raises(ValueError, match="cpu_kernel=sse9: expected one of auto, avx512, avx2, baseline, generic"):
        lenet_ext.set_cpu_kernel("sse9")
    run = _cpu_kernel_in_a_new_process({"LENET_EXT_CPU_KERNEL": "sse9"})
    assert "LENET_EXT_CPU_KERNEL=sse9: expected one of auto" in run.stderr


def test_cpu_kernel_is_read_from_the_environment_once(monkeypatch):
    """LENET_EXT_CPU_KERNEL is read at the first call that needs it, not at every call."""
    run = _cpu_kernel_in_a_new_process({"LENET_EXT_CPU_KERNEL": "generic"})
    assert run.stdout.strip() == "generic"
    before = lenet_ext._C.cpu_kernel()
    monkeypatch.setenv("LENET_EXT_CPU_KERNEL", "sse9")
    assert lenet_ext._C.cpu_kernel() == before


@pytest.mark.parametrize("capability, widest", [("default", "baseline"), ("avx2", "avx2")])
def test_aten_cpu_capability_caps_the_choice(capability, widest):
    if widest not in CPU_KERNELS:
        pytest.skip(f"this CPU has no {widest}")
    run = _cpu_kernel_in_a_new_process({"ATEN_CPU_CAPABILITY": capability, "LENET_EXT_CPU_KERNEL": "auto"})
    assert run.stdout.strip() == widest, run.stderr
    if "avx512" in CPU_KERNELS:
        run = _cpu_kernel_in_a_new_process({"ATEN_CPU_CAPABILITY": capability, "LENET_EXT_CPU_KERNEL": "avx512"})
        assert f"ATEN_CPU_CAPABILITY={capability} rules out that instruction set" in run.stderr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)],
    ids=["x", "weight", "bias", "params"],
)
def test_any_subset_of_gradients(needs, device):
    x, weight, bias, padding, pool = make_inputs(CASES["rgb_5_out"], torch.float64, device)
    tensors = [t.detach().requires_grad_(need) for t, need in zip((x, weight, bias), needs)]
    conv_sigmoid_avgpool2d(*tensors, padding, pool).sum().backward()
    ref = [t.detach().cpu().requires_grad_(need) for t, need in zip((x, weight, bias), needs)]
    reference(*ref, padding, pool).sum().backward()
    for got, want, need in zip(tensors, ref, needs):
        assert (got.grad is not None) == need
        if need:
            torch.testing.assert_close(got.grad.cpu(), want.grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_strided_inputs(layout, device):
    x, weight, bias, padding, pool = make_inputs(CASES["rgb_5_out"], torch.float64, device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)[:, :, 1:, ::2]
        bias = torch.stack([bias, bias], 1)[:, 0]
        assert not x.is_contiguous() and not bias.is_contiguous()
    tensors = (x, weight, bias)
    ref_out = reference(*(t.cpu() for t in tensors), padding, pool)
    grad_out = torch.randn_like(ref_out)
    out, grads = grads_of(lambda *t: conv_sigmoid_avgpool2d(*t, padding, pool), tensors, grad_out.to(device))
    _, ref_grads = grads_of(lambda *t: reference(*t, padding, pool), tuple(t.cpu() for t in tensors), grad_out)
    torch.testing.assert_close(out.cpu(), ref_out, **TOLERANCES[torch.float64])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu(), want, **TOLERANCES[torch.float64])


def test_torch_ops_namespace_and_defaults():
    x, weight, bias, _, _ = make_inputs(CASES["lenet_layer2"], torch.float64, "cpu")
    torch.testing.assert_close(
        torch.ops.lenet_ext.conv_sigmoid_avgpool2d(x, weight), reference(x, weight, None, 0, 2)
    )
    torch.testing.assert_close(
        torch.ops.lenet_ext.conv_sigmoid_avgpool2d(x, weight, bias, 1, 3), reference(x, weight, bias, 1, 3)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "case",
    [(2, 1, 2, 6, 6, 3, 1, 2), (1, 2, 3, 7, 5, 3, 0, 2), (2, 3, 2, 5, 5, 1, 0, 3)],
    ids=["padded", "floors", "kernel1_pool3"],
)
def test_gradcheck(case, with_bias, device):
    x, weight, bias, padding, pool = make_inputs(case, torch.float64, device, with_bias)
    tensors = tuple(t.requires_grad_() for t in (x, weight, bias) if t is not None)
    if with_bias:
        fn = lambda x, w, b: conv_sigmoid_avgpool2d(x, w, b, padding, pool)  # noqa: E731
    else:
        fn = lambda x, w: conv_sigmoid_avgpool2d(x, w, None, padding, pool)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("case", ["lenet_layer1", "lenet_layer2", "pool3_floors", "batch0"])
def test_opcheck_forward(case, requires_grad, device):
    x, weight, bias, padding, pool = make_inputs(CASES[case], torch.float32, device)
    for t in (x, weight, bias):
        t.requires_grad_(requires_grad)
    opcheck(OP, (x, weight, bias, padding, pool))
    opcheck(OP, (x, weight), {"padding": padding, "pool": pool})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, False]])
@pytest.mark.parametrize("case", ["lenet_layer1", "pool3_floors"])
def test_opcheck_backward(case, mask, device):
    x, weight, bias, padding, pool = make_inputs(CASES[case], torch.float32, device)
    grad_out = torch.randn_like(OP(x, weight, bias, padding, pool))
    opcheck(BACKWARD_OP, (grad_out, x, weight, bias, padding, pool, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_masks_return_none(device):
    x, weight, bias, padding, pool = make_inputs(CASES["rgb_5_out"], torch.float64, device)
    grad_out = torch.ones_like(OP(x, weight, bias, padding, pool))
    grad_x, grad_weight, grad_bias = BACKWARD_OP(grad_out, x, weight, None, padding, pool, [False, True, True])
    assert grad_x is None and grad_bias is None and grad_weight.shape == weight.shape


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    x, weight, bias, padding, pool = make_inputs(CASES["lenet_layer2"], torch.float32, device)

    def block(x, weight, bias):
        return conv_sigmoid_avgpool2d(x, weight, bias, padding, pool).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = grads_of(block, (x, weight, bias), torch.tensor(1.0, device=device))
    loss, grads = grads_of(compiled, (x, weight, bias), torch.tensor(1.0, device=device))
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_export_keeps_the_custom_op():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(6, 16, 5)

        def forward(self, x):
            return conv_sigmoid_avgpool2d(x, self.conv.weight, self.conv.bias, 0, 2)

    x = torch.randn(2, 6, 14, 14)
    batch = torch.export.Dim("batch", min=1)
    block = Block()
    exported = torch.export.export(block, (x,), dynamic_shapes={"x": {0: batch}})
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert OP in targets
    y = torch.randn(5, 6, 14, 14)
    conv = block.conv
    torch.testing.assert_close(exported.module()(y), reference(y, conv.weight, conv.bias, 0, 2).detach(), **TOLERANCES[torch.float32])


@requires_cuda
@pytest.mark.parametrize("case", ["lenet_layer1", "lenet_layer2", "pool3_floors"])
def test_cpu_and_cuda_agree(case):
    x, weight, bias, padding, pool = make_inputs(CASES[case], torch.float32, "cpu")
    grad_out = torch.randn_like(reference(x, weight, bias, padding, pool))
    fn = lambda *t: conv_sigmoid_avgpool2d(*t, padding, pool)  # noqa: E731
    cpu_out, cpu_grads = grads_of(fn, (x, weight, bias), grad_out)
    cuda_out, cuda_grads = grads_of(fn, tuple(t.cuda() for t in (x, weight, bias)), grad_out.cuda())
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, **TOLERANCES[torch.float32])
    for got, want in zip(cuda_grads, cpu_grads):
        torch.testing.assert_close(got.cpu(), want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_gradgradcheck(with_bias, device):
    """Second-order gradients (create_graph=True) are correct, not silently zero."""
    x, weight, bias, padding, pool = make_inputs((2, 2, 3, 6, 5, 3, 1, 2), torch.float64, device, with_bias)
    tensors = tuple(t.requires_grad_() for t in (x, weight, bias) if t is not None)
    fn = lambda x, w, *b: conv_sigmoid_avgpool2d(x, w, *(b or (None,)), padding, pool)  # noqa: E731
    # create_graph differentiates ATen's conv2d, whose double backward on CUDA
    # (cuDNN) adds in a varying order: two runs differ in the last bits.
    nondet_tol = 1e-10 if device == "cuda" else 0.0
    assert torch.autograd.gradgradcheck(fn, tensors, nondet_tol=nondet_tol)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_penalty_matches_reference(device):
    """The reproducer: d/dweight of |d loss/dx|^2 through the fused operator."""
    x, weight, bias, padding, pool = make_inputs(CASES["rgb_5_out"], torch.float64, device)

    def penalty_grad(fn):
        xs, ws, bs = (t.detach().requires_grad_() for t in (x, weight, bias))
        (gx,) = torch.autograd.grad(fn(xs, ws, bs, padding, pool).square().sum(), xs, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (ws, bs))

    got, want = penalty_grad(conv_sigmoid_avgpool2d), penalty_grad(reference)
    assert want[0].abs().max() > 0.1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOLERANCES[torch.float64])
