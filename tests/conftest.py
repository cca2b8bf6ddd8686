import os

import pytest
import torch

CUDA_SKIP_REASON = "no CUDA device visible (torch.cuda.is_available() is False)"

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)),
]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)


def _cpu_kernels():
    """The float32 CPU kernels this machine can run: generic plus each instruction set it supports."""
    import lenet_ext

    available = ["generic", "baseline"]
    previous = os.environ.get("LENET_EXT_CPU_KERNEL")
    for isa in ("avx2", "avx512"):
        try:
            os.environ["LENET_EXT_CPU_KERNEL"] = isa
            if lenet_ext._C.cpu_kernel() == isa:
                available.append(isa)
        except (ValueError, RuntimeError):  # not supported by this CPU
            pass
        finally:
            if previous is None:
                os.environ.pop("LENET_EXT_CPU_KERNEL", None)
            else:
                os.environ["LENET_EXT_CPU_KERNEL"] = previous
    return available


CPU_KERNELS = _cpu_kernels()


@pytest.fixture(params=CPU_KERNELS)
def cpu_kernel(request, monkeypatch):
    """Runs a test once per float32 CPU kernel (LENET_EXT_CPU_KERNEL is read at every call)."""
    monkeypatch.setenv("LENET_EXT_CPU_KERNEL", request.param)
    return request.param
