import pytest
import torch

CUDA_SKIP_REASON = "no CUDA device visible: the CUDA kernels are compiled but cannot run here"

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)),
]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
