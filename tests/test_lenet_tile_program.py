"""The tile program of lenet_forward's CUDA kernel (csrc/ops/lenet_forward_tile.h), run on the CPU.

lenet_ext::_lenet_forward_tile_emulated runs the kernel's phases thread by
thread; each phase runs twice, its threads in opposite orders, and fails if
the results differ (a race the barrier would have to prevent). These tests
check its index math, shared-memory layout and partial last tiles against the
PyTorch reference without a GPU.
"""

import pytest
import torch

from lenet_ext import LeNet
from lenet_ext.model import lenet_args
from lenet_ext.ops import reference_lenet_forward

EMULATED = torch.ops.lenet_ext._lenet_forward_tile_emulated.default


def random_lenet_args(batch, in_channels=1, size=28, c1=6, k1=5, pad1=2, pool1=2, c2=16, k2=5, pad2=0, pool2=2,
                      f1=120, f2=84, f3=10, bias=True, seed=0):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    h1 = (size + 2 * pad1 - k1 + 1) // pool1
    h2 = (h1 + 2 * pad2 - k2 + 1) // pool2
    f0 = c2 * h2 * h2
    maybe = (lambda t: t) if bias else (lambda t: None)
    return (
        torch.rand(batch, in_channels, size, size, generator=gen),
        randn(c1, in_channels, k1, k1, scale=1 / k1), maybe(randn(c1)), pad1, pool1,
        randn(c2, c1, k2, k2, scale=1 / k2), maybe(randn(c2)), pad2, pool2,
        randn(f1, f0, scale=f0**-0.5), maybe(randn(f1)), randn(f2, f1, scale=f1**-0.5), maybe(randn(f2)),
        randn(f3, f2, scale=f2**-0.5), maybe(randn(f3)),
    )  # fmt: skip


def reference(args):
    return reference_lenet_forward(*(a.double() if isinstance(a, torch.Tensor) else a for a in args)).float()


@pytest.mark.parametrize("batch", [1, 7, 8, 9, 17])
@pytest.mark.parametrize("tile, threads", [(1, 1), (3, 7), (8, 256), (4, 33)])
def test_lenet_tile_program_matches_the_reference(batch, tile, threads):
    """Partial last tiles, tiles larger than the batch, fewer threads than items and more."""
    args = lenet_args(torch.rand(batch, 1, 28, 28), LeNet())
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.testing.assert_close(EMULATED(*args, tile, threads), reference(args), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize(
    "config",
    [
        dict(size=32, pad1=0),  # LeCun's original input
        dict(in_channels=3, f3=47, bias=False),
        dict(size=13, k1=3, pad1=1, pool1=3, c1=5, k2=2, pad2=1, pool2=1, c2=3, f1=9, f2=7, f3=4),
        dict(size=9, k1=1, pad1=0, pool1=1, c1=2, k2=3, pad2=2, pool2=4, c2=17, f1=5, f2=3, f3=2),
    ],
    ids=["32x32", "rgb_47_classes_no_bias", "odd_pools_and_paddings", "kernel1_pool4"],
)
def test_lenet_tile_program_takes_every_configuration(config):
    args = random_lenet_args(5, **config)
    torch.testing.assert_close(EMULATED(*args, 2, 64), reference(args), atol=2e-5, rtol=2e-4)


def test_lenet_tile_program_empty_batch_and_bad_input():
    args = random_lenet_args(0)
    assert EMULATED(*args, 8, 256).shape == (0, 10)
    args = list(random_lenet_args(2))
    args[9] = torch.randn(120, 399)
    with pytest.raises(ValueError, match=r"fc1_weight of shape \(out_features, 400\)"):
        EMULATED(*args, 8, 256)
    with pytest.raises(TypeError, match="float32"):
        EMULATED(*(a.double() if isinstance(a, torch.Tensor) else a for a in random_lenet_args(2)), 8, 256)
