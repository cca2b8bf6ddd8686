import pytest
import torch
from hypothesis import HealthCheck, settings

import lenet_ext

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
