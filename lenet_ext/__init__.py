"""lenet_ext: LeNet-5 with fused conv -> sigmoid -> avgpool kernels for CPU and CUDA."""

import torch

from . import _extension

_C = _extension.load()

from . import ops  # noqa: E402  (registers fake kernels and autograd for the C++ ops)
from .fuse import FusedSequential, fuse  # noqa: E402
from .model import LeNet, reference_lenet  # noqa: E402
from .shapes import get_output_size, summary  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "LeNet",
    "reference_lenet",
    "fuse",
    "FusedSequential",
    "get_output_size",
    "summary",
    "ops",
    "build_info",
    "set_cpu_kernel",
]


def build_info() -> dict:
    """What this installation was built with, and what it runs with now."""
    return {
        "lenet_ext": __version__,
        "torch_built_against": _C.torch_version,
        "torch": torch.__version__,
        "cuda_kernels": bool(_C.with_cuda),
        "cuda_archs": _C.cuda_archs or None,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        # float32 kernels in use; LENET_EXT_CPU_KERNEL=generic|baseline|avx2|avx512 overrides.
        "cpu_kernel": _C.cpu_kernel(),
        # lenet_forward on CUDA: fused (one launch) or reference; LENET_EXT_CUDA_KERNEL overrides.
        "cuda_kernel": _C.cuda_kernel(),
        # images per thread block of the CUDA tile programs: auto, or LENET_EXT_CUDA_TILE's number.
        "cuda_tile": _C.cuda_tile(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def set_cpu_kernel(name: str) -> str:
    """Runs later float32 CPU calls on the named kernels and returns the name in use before.

    The names are LENET_EXT_CPU_KERNEL's: generic, baseline, avx2, avx512, or
    auto (the widest this CPU supports, capped by ATEN_CPU_CAPABILITY). The
    environment variable is read once, at the first call that needs it; this
    switches later calls (for tests and comparisons, e.g. against generic).
    """
    before = _C.cpu_kernel()
    _C.set_cpu_kernel(name)
    return before
