import pytest
import torch
from torch import nn
from hypothesis import HealthCheck, settings

import lenet_ext
from lenet_ext import LeNet

# Hypothesis profiles for tests/test_properties.py: "ci" (the default, what CI
# runs) and "long" (pytest --hypothesis-profile=long). The examples' sizes vary
# a lot, so no per-example deadline.
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

CUDA_SKIP_REASON = "no CUDA device visible (torch.cuda.is_available() is False)"

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)),
]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)


def _cpu_kernels():
    """The float32 CPU kernels this machine can run: generic plus each instruction set it supports."""
    before = lenet_ext.set_cpu_kernel("generic")
    available = ["generic", "baseline"]
    for isa in ("avx2", "avx512"):
        try:
            lenet_ext.set_cpu_kernel(isa)
            available.append(isa)
        except (ValueError, RuntimeError):  # not supported by this CPU, or ruled out by ATEN_CPU_CAPABILITY
            pass
    lenet_ext.set_cpu_kernel(before)
    return available


CPU_KERNELS = _cpu_kernels()


@pytest.fixture(params=CPU_KERNELS)
def cpu_kernel(request):
    """Runs a test once per float32 CPU kernel, then restores the one chosen before."""
    before = lenet_ext.set_cpu_kernel(request.param)
    yield request.param
    lenet_ext.set_cpu_kernel(before)


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

# LeNet against the reference: float32 sums run in another order.
LENET_TOLERANCES = {
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
