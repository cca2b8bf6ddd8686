"""Under torch.autocast the operators give the reference's dtypes, and values within low-precision tolerances."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lenet_ext import LeNet
from lenet_ext.ops import conv_sigmoid_avgpool2d, reference_conv_sigmoid_avgpool2d

from conftest import requires_cuda

# (device, autocast dtype): bfloat16 on the CPU (autocast's default there),
# both half types on CUDA.
AUTOCASTS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float16, id="cuda-float16", marks=requires_cuda),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=requires_cuda),
]

# lenet_ext computes in float32 and rounds once; the reference rounds after
# every layer. Both are compared with float32 arithmetic: bfloat16 keeps 8
# significant bits (relative step 2^-8 = 0.4%), float16 11 bits.
LOW_PRECISION = {
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}


@pytest.mark.parametrize("device, dtype", AUTOCASTS)
def test_operator_under_autocast(device, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 14, 14, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(16, 6, 5, 5, generator=gen) / 5).to(device).requires_grad_()
    bias = torch.randn(16, generator=gen).to(device).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        out = conv_sigmoid_avgpool2d(x, weight, bias, 1, 2)
        ref = reference_conv_sigmoid_avgpool2d(x, weight, bias, 1, 2)
    assert out.dtype == ref.dtype == dtype
    grads = torch.autograd.grad(out.float().square().sum(), (x, weight, bias))
    assert [g.dtype for g in grads] == [torch.float32] * 3
    exact = reference_conv_sigmoid_avgpool2d(x, weight, bias, 1, 2)
    exact_grads = torch.autograd.grad(exact.square().sum(), (x, weight, bias))
    torch.testing.assert_close(out.float(), exact, **LOW_PRECISION[dtype])
    for got, want in zip(grads, exact_grads):
        torch.testing.assert_close(got, want, atol=LOW_PRECISION[dtype]["atol"] * want.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("device, dtype", AUTOCASTS)
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_lenet_under_autocast(mode, device, dtype):
    torch.manual_seed(0)
    net = LeNet().to(device)
    ref = nn.Sequential(*LeNet()).to(device)
    ref.load_state_dict(net.state_dict())
    x = torch.rand(6, 1, 28, 28, device=device)
    target = torch.randint(0, 10, (6,), device=device)
    if mode == "inference":
        with torch.inference_mode(), torch.autocast(device, dtype=dtype):
            out, want = net(x), ref(x)
        assert out.dtype == want.dtype == dtype
        torch.testing.assert_close(out.float(), ref(x), **LOW_PRECISION[dtype])
        torch.testing.assert_close(out.float(), want.float(), **LOW_PRECISION[dtype])
        return
    with torch.autocast(device, dtype=dtype):
        out, want = net(x), ref(x)
        loss = F.cross_entropy(out, target)
    assert out.dtype == want.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), **LOW_PRECISION[dtype])
    loss.backward()
    F.cross_entropy(ref(x), target).backward()  # the float32 gradients
    for p, q in zip(net.parameters(), ref.parameters()):
        assert p.grad.dtype == p.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, atol=LOW_PRECISION[dtype]["atol"] * q.grad.abs().max().item(), rtol=0.05)


def test_float64_stays_float64_under_autocast():
    """Autocast leaves float64 alone, in the reference and here."""
    net = LeNet().double()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == nn.Sequential(*net)(x).dtype == torch.float64


def test_compile_under_autocast():
    """The fake kernels give the same dtypes, so torch.compile traces the autocast kernels."""
    torch.manual_seed(0)
    net = LeNet()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = torch.rand(4, 1, 28, 28)
    target = torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        eager = net(x)
        F.cross_entropy(out, target).backward()
    assert out.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(out, eager)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
