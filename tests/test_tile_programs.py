"""The CUDA tile programs, run on the CPU: lenet_forward's (csrc/ops/tile/lenet_forward_tile.h),
lenet_backward's (csrc/ops/tile/lenet_backward_tile.h, with conv block 1's backward and the
partial sums of csrc/ops/tile/tile_partial_sums.h), and the conv operator's forward and
backward (csrc/ops/tile/conv_sigmoid_avgpool2d_tile.h).

The lenet_ext::_*_tile_emulated operators run a kernel's phases thread by
thread; each phase runs twice, its threads in opposite orders, and fails if
the shared memory differs (a race the barrier would have to prevent), and
each operator runs twice, its blocks in opposite orders, and fails if its
outputs differ (a race that reaches global memory); a phase that writes past
its block's shared memory fails too. These tests check the programs' index
math, shared-memory layouts and partial last tiles against the PyTorch
reference without a GPU, and that the checks catch what they are for.
"""

import pytest
import torch

from lenet_ext import LeNet
from lenet_ext.model import lenet_args
from lenet_ext.ops import reference_lenet_forward

from test_conv_sigmoid_avgpool2d import CASES, NON_FINITE, TOLERANCES, grads_of, make_inputs, non_finite_pixel_grads
from test_conv_sigmoid_avgpool2d import reference as reference_conv

EMULATED = torch.ops.lenet_ext._lenet_forward_tile_emulated.default
TRAIN_EMULATED = torch.ops.lenet_ext._lenet_train_forward_tile_emulated.default
CONV_EMULATED = torch.ops.lenet_ext._conv_sigmoid_avgpool2d_tile_emulated.default
CONV_BACKWARD_EMULATED = torch.ops.lenet_ext._conv_sigmoid_avgpool2d_backward_tile_emulated.default
BACKWARD_EMULATED = torch.ops.lenet_ext._lenet_backward_tile_emulated.default
SUMS_EMULATED = torch.ops.lenet_ext._tile_partial_sums_emulated.default
RACE_PROBE = torch.ops.lenet_ext._tile_emulation_race_probe.default
# (images per block, threads per block): one thread, fewer threads than items,
# a tile that does not divide the batch, the CUDA launch's shape.
TILINGS = [(1, 1), (3, 7), (2, 33), (8, 256)]


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
@pytest.mark.parametrize("tile, threads", [(1, 1), (3, 7), (8, 256), (4, 33), (11, 64)])
def test_lenet_tile_program_matches_the_reference(batch, tile, threads):
    """Partial last tiles, tiles larger than the batch, fewer threads than items and more,
    and more images than a dense thread keeps in registers at once (11 > 8)."""
    args = lenet_args(torch.rand(batch, 1, 28, 28), LeNet())
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.testing.assert_close(EMULATED(*args, tile, threads), reference(args), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("tile", range(1, 18))
def test_lenet_tile_program_takes_every_tile_size(tile):
    """The dense phases run the images of a tile in passes of up to eight, each image count a
    separate loop: every count, a pass of eight and one of the rest, and a tile past the batch."""
    args = random_lenet_args(17, seed=tile)
    torch.testing.assert_close(EMULATED(*args, tile, 64), reference(args), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize(
    "config",
    [
        dict(size=32, pad1=0),  # LeCun's original input
        dict(in_channels=3, f3=47, bias=False),
        dict(size=13, k1=3, pad1=1, pool1=3, c1=5, k2=2, pad2=1, pool2=1, c2=3, f1=9, f2=7, f3=4),
        dict(size=9, k1=1, pad1=0, pool1=1, c1=2, k2=3, pad2=2, pool2=4, c2=17, f1=5, f2=3, f3=2),
        dict(c1=10, c2=12, f1=30),  # both blocks' last channel group part full
        dict(size=27),  # both blocks' padded rows of odd length: windows read a float at a time
    ],
    ids=["32x32", "rgb_47_classes_no_bias", "odd_pools_and_paddings", "kernel1_pool4", "partial_channel_groups",
         "odd_rows"],
)
def test_lenet_tile_program_takes_every_configuration(config):
    args = random_lenet_args(5, **config)
    torch.testing.assert_close(EMULATED(*args, 2, 64), reference(args), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("batch, tile, threads", [(1, 1, 1), (9, 2, 33), (17, 8, 256), (13, 11, 64)])
@pytest.mark.parametrize("config", [{}, dict(size=13, k1=3, pad1=1, pool1=3, c1=5, k2=2, pad2=1, pool2=1, c2=3,
                                             f1=9, f2=7, f3=4, bias=False)], ids=["lenet", "odd_sizes"])
def test_lenet_train_tile_program_returns_what_backward_reads(batch, tile, threads, config):
    """The logits and every saved activation, as lenet_train_forward returns them, only for the real images."""
    args = random_lenet_args(batch, **config)
    want = torch.ops.lenet_ext.lenet_train_forward(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    got = TRAIN_EMULATED(*args, tile, threads)
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float32 and g.is_contiguous()
        torch.testing.assert_close(g, w.float(), atol=2e-5, rtol=2e-4)


def test_lenet_tile_program_reads_dense_weights_that_are_not_16_byte_aligned():
    """A weight at an odd offset into its storage takes the one-float path (a float4 load would fault on a GPU)."""
    args = list(random_lenet_args(9))
    storage = torch.empty(args[9].numel() + 1)
    args[9] = storage[1:].view_as(args[9]).copy_(args[9])
    assert args[9].data_ptr() % 16 != 0 and args[9].is_contiguous()
    torch.testing.assert_close(EMULATED(*args, 8, 256), reference(args), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("offset", [1, 2], ids=["4_bytes", "8_bytes"])
def test_tile_programs_stage_images_that_are_not_16_byte_aligned(offset):
    """x off a 16-byte boundary: LeNet's rows, whole quads of floats, are staged a float at a
    time (a quad's load would fault on a GPU, and the emulation stops there)."""
    args = list(random_lenet_args(9))
    storage = torch.empty(args[0].numel() + offset)
    args[0] = storage[offset:].view_as(args[0]).copy_(args[0])
    assert args[0].data_ptr() % 16 != 0 and args[0].is_contiguous()
    torch.testing.assert_close(EMULATED(*args, 5, 64), reference(args), atol=2e-5, rtol=2e-4)
    x, weight, bias, padding, pool = make_inputs(CASES["row_quads_padding2"], torch.float32, "cpu")
    shifted = torch.empty(x.numel() + offset)[offset:].view_as(x).copy_(x)
    out = CONV_EMULATED(x, weight, bias, padding, pool, 2, 33)
    torch.testing.assert_close(CONV_EMULATED(shifted, weight, bias, padding, pool, 2, 33), out, atol=0, rtol=0)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = [CONV_BACKWARD_EMULATED(grad_out, t, weight, bias, padding, pool, [True] * 3, 2, 33) for t in (x, shifted)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_lenet_tile_program_empty_batch_and_bad_input():
    args = random_lenet_args(0)
    assert EMULATED(*args, 8, 256).shape == (0, 10)
    assert [t.shape for t in TRAIN_EMULATED(*args, 8, 256)] == [(0, 10), (0, 6, 14, 14), (0, 400), (0, 120), (0, 84)]
    args = list(random_lenet_args(2))
    args[9] = torch.randn(120, 399)
    with pytest.raises(ValueError, match=r"fc1_weight of shape \(out_features, 400\)"):
        EMULATED(*args, 8, 256)
    with pytest.raises(TypeError, match="float32"):
        EMULATED(*(a.double() if isinstance(a, torch.Tensor) else a for a in random_lenet_args(2)), 8, 256)


def backward_inputs(args, seed=1):
    """grad_logits and what lenet_train_forward saves, for args."""
    logits, *saved = torch.ops.lenet_ext.lenet_train_forward(*args)
    grad_logits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return (grad_logits, args[0], *saved)


def reference_grads(inputs, args, mask):
    """lenet_backward in float64 on the same inputs."""
    double = [a.double() if isinstance(a, torch.Tensor) else a for a in (*inputs, *args[1:])]
    return torch.ops.lenet_ext.lenet_backward(*double, mask)


def assert_grads_match(got, want, mask):
    for i, (asked, g, w) in enumerate(zip(mask, got, want)):
        assert (g is None) == (w is None), i
        if w is None:
            continue
        assert g.shape == w.shape and g.dtype == torch.float32 and g.is_contiguous(), i
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-4, msg=f"gradient {i}")


@pytest.mark.parametrize("batch, tile, conv1_tile, threads",
                         [(1, 1, 1, 1), (9, 2, 3, 33), (17, 8, 8, 256), (13, 11, 4, 64), (5, 8, 1, 7)])  # fmt: skip
@pytest.mark.parametrize("config", [{}, dict(size=13, k1=3, pad1=1, pool1=3, c1=5, k2=2, pad2=1, pool2=1, c2=3,
                                             f1=9, f2=7, f3=4, bias=False),
                                    dict(in_channels=3, size=32, pad1=0, f3=47)],
                         ids=["lenet", "odd_sizes_no_bias", "rgb_32x32_47_classes"])  # fmt: skip
def test_lenet_backward_tile_programs_match_the_reference(batch, tile, conv1_tile, threads, config):
    """Every gradient against float64: partial last tiles, tiles larger than the batch, more
    images than a dense thread keeps in registers (11 > 8), fewer threads than items."""
    args = random_lenet_args(batch, **config)
    inputs = backward_inputs(args)
    mask = [True] * 11
    got = BACKWARD_EMULATED(*inputs, *args[1:], mask, tile, conv1_tile, threads)
    assert_grads_match(got, reference_grads(inputs, args, mask), mask)


@NON_FINITE
def test_lenet_tile_programs_meet_a_non_finite_pixel_as_the_reference(value):
    """An infinite pixel saturates the units it reaches, whose zero derivative times it is NaN in
    conv1's weight gradient; the logits and the other gradients stay as the reference's."""
    args = random_lenet_args(9)
    args[0][0, 0, 9, 12] = value
    torch.testing.assert_close(EMULATED(*args, 8, 256), reference(args), equal_nan=True, atol=2e-5, rtol=2e-4)
    inputs = backward_inputs(args)
    mask = [True] * 11
    got = BACKWARD_EMULATED(*inputs, *args[1:], mask, 8, 1, 256)
    for i, (g, w) in enumerate(zip(got, reference_grads(inputs, args, mask))):
        torch.testing.assert_close(g.double(), w, equal_nan=True, atol=1e-5, rtol=1e-4, msg=f"gradient {i}")


@pytest.mark.parametrize("tile", range(1, 18))
def test_lenet_backward_tile_program_takes_every_tile_size(tile):
    """Its dense products, too, run a tile's images in passes of up to eight, each count a loop of its own."""
    args = random_lenet_args(17, seed=tile)
    inputs = backward_inputs(args)
    mask = [True] * 11
    got = BACKWARD_EMULATED(*inputs, *args[1:], mask, tile, 2, 64)
    assert_grads_match(got, reference_grads(inputs, args, mask), mask)


@pytest.mark.parametrize(
    "asked",
    [["x"], ["conv1_weight"], ["conv2_bias"], ["fc1_weight", "fc3_bias"], ["fc2_bias"], ["fc3_weight"],
     ["x", "fc2_weight"], []],
)  # fmt: skip
def test_lenet_backward_tile_programs_compute_what_is_asked(asked):
    """Only the gradients asked for come back; the programs skip the conv blocks when nothing
    below them is asked for, and a call that needs nothing below fc3 runs the whole batch."""
    names = ["x", "conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias", "fc1_weight", "fc1_bias",
             "fc2_weight", "fc2_bias", "fc3_weight", "fc3_bias"]  # fmt: skip
    mask = [name in asked for name in names]
    args = random_lenet_args(6)
    inputs = backward_inputs(args)
    got = BACKWARD_EMULATED(*inputs, *args[1:], mask, 4, 2, 64)
    assert_grads_match(got, reference_grads(inputs, args, mask), mask)
    assert [g is not None for g in got] == mask


def test_lenet_backward_tile_programs_over_more_tiles_than_one_pass_of_sums_adds():
    """520 tiles of one image: more rows of partial sums than a block adds (512), so the
    bias and conv gradients take two passes; the dense weight gradients, 31 splits of the
    batch, the last one short."""
    args = random_lenet_args(520)
    inputs = backward_inputs(args)
    mask = [False] + [True] * 10
    got = BACKWARD_EMULATED(*inputs, *args[1:], mask, 1, 1, 256)
    assert_grads_match(got, reference_grads(inputs, args, mask), mask)


def test_lenet_backward_tile_programs_are_bitwise_repeatable_and_match_lenet_backward():
    args = random_lenet_args(21)
    inputs = backward_inputs(args)
    mask = [True] * 11
    first = BACKWARD_EMULATED(*inputs, *args[1:], mask, 4, 4, 256)
    second = BACKWARD_EMULATED(*inputs, *args[1:], mask, 4, 4, 256)
    for a, b, c in zip(first, second, torch.ops.lenet_ext.lenet_backward(*inputs, *args[1:], mask)):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def misaligned(t):
    """t's values in a tensor whose data starts one float past a 16-byte boundary."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    return out.copy_(t)


def test_lenet_backward_tile_programs_take_misaligned_inputs():
    """Saved activations and gradients one float off a 16-byte boundary: the programs read them
    without vector loads (the emulation stops at a misaligned one, where the GPU would fault)."""
    args = random_lenet_args(7)
    grad_logits, x, block1, block2, fc1, fc2 = backward_inputs(args)
    inputs = (misaligned(grad_logits), x, misaligned(block1), misaligned(block2), misaligned(fc1), misaligned(fc2))
    assert all(t.data_ptr() % 16 != 0 for t in inputs[2:])
    mask = [True] * 11
    got = BACKWARD_EMULATED(*inputs, *args[1:], mask, 2, 2, 64)
    assert_grads_match(got, reference_grads(inputs, args, mask), mask)


def test_lenet_backward_tile_programs_empty_batch_and_bad_input():
    args = random_lenet_args(0)
    inputs = backward_inputs(args)
    got = BACKWARD_EMULATED(*inputs, *args[1:], [True] * 11, 8, 8, 256)
    assert got[0].shape == (0, 1, 28, 28)
    params = [a for a in args[1:] if isinstance(a, torch.Tensor)]
    assert len(params) == 10
    assert all(g.shape == a.shape and not g.any() for g, a in zip(got[1:], params))
    args = random_lenet_args(3)
    inputs = backward_inputs(args)
    with pytest.raises(ValueError, match="expected 1 <= tile <= 1024, got 0"):
        BACKWARD_EMULATED(*inputs, *args[1:], [True] * 11, 2, 0, 64)
    with pytest.raises(ValueError, match="expected threads >= 1, got 0"):
        BACKWARD_EMULATED(*inputs, *args[1:], [True] * 11, 2, 2, 0)
    with pytest.raises(ValueError, match=r"expected fc1 of shape \[3, 120\]"):
        BACKWARD_EMULATED(*inputs[:4], inputs[4][:, :7], inputs[5], *args[1:], [True] * 11, 2, 2, 64)


@pytest.mark.parametrize("tile, threads", TILINGS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_conv_tile_programs_match_the_reference(case, with_bias, tile, threads):
    """Forward and every gradient, against float64, on the conv operator's awkward shapes."""
    x, weight, bias, padding, pool = make_inputs(case, torch.float32, "cpu", with_bias)
    out = CONV_EMULATED(x, weight, bias, padding, pool, tile, threads)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tensors = (x, weight, bias)
    ref_out, ref_grads = grads_of(
        lambda *t: reference_conv(*t, padding, pool), tuple(None if t is None else t.double() for t in tensors), grad_out
    )
    grads = CONV_BACKWARD_EMULATED(grad_out.float(), x, weight, bias, padding, pool, [True, True, True], tile, threads)
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[torch.float32])
    assert (grads[2] is None) == (bias is None)
    for got, want in zip([g for g in grads if g is not None], ref_grads):
        torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True], [False] * 3])
def test_conv_backward_tile_program_computes_what_is_asked(mask):
    x, weight, bias, padding, pool = make_inputs(CASES["lenet_layer2"], torch.float32, "cpu")
    grad_out = torch.randn(3, 16, 5, 5)
    got = CONV_BACKWARD_EMULATED(grad_out, x, weight, bias, padding, pool, mask, 2, 64)
    want = torch.ops.lenet_ext.conv_sigmoid_avgpool2d_backward(grad_out, x, weight, bias, padding, pool, mask)
    for asked, g, w in zip(mask, got, want):
        assert (g is not None) == asked
        if asked:
            torch.testing.assert_close(g, w, **TOLERANCES[torch.float32])


@NON_FINITE
@pytest.mark.parametrize("out_channels", [16, 6], ids=["whole_groups", "partial_group"])
def test_conv_tile_programs_meet_a_non_finite_pixel_as_torch(out_channels, value):
    def emulated(x, weight, bias, padding, pool):
        return _EmulatedConv.apply(x, weight, bias, padding, pool)

    got = non_finite_pixel_grads(emulated, value, 3, out_channels, 14)
    want = non_finite_pixel_grads(reference_conv, value, 3, out_channels, 14)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, **TOLERANCES[torch.float32])


class _EmulatedConv(torch.autograd.Function):
    """The conv operator's tile programs, forward and backward, as one differentiable function."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, pool):
        ctx.save_for_backward(x, weight, bias)
        ctx.sizes = (padding, pool)
        return CONV_EMULATED(x, weight, bias, padding, pool, 2, 64)

    @staticmethod
    def backward(ctx, grad_out):
        return (*CONV_BACKWARD_EMULATED(grad_out, *ctx.saved_tensors, *ctx.sizes, [True] * 3, 2, 64), None, None)


# z from -100 to 100, with the edges of the tile programs' sigmoid: below
# -87 it is 0, where the sigmoid is under 1.7e-38 (tile_sigmoid in
# csrc/ops/tile/tile_common.h).
SIGMOID_ARGUMENTS = torch.cat([torch.linspace(-100, 100, 2001), torch.tensor([-87.01, -87.0, -86.99, 88.5, 89.0])])


def check_tile_sigmoid(pooled, grad_z, z):
    """pooled: the conv operator's output for a 1x1 kernel of weight 1, no bias and no pooling (sigmoid(z) itself);
    grad_z: its backward for a gradient of ones (s * (1 - s) with s that output). Both against float64: within
    float32 rounding (expf's few ulps) for z >= -87, and under 1.7e-38 below. Where s rounds to 1, 1 - s keeps
    only its absolute accuracy."""
    want = torch.sigmoid(z.double())
    torch.testing.assert_close(pooled.double().flatten(), want, rtol=4e-7, atol=1.7e-38)
    torch.testing.assert_close(grad_z.double().flatten(), want * (1 - want), rtol=1e-6, atol=2e-7)


def test_tile_programs_sigmoid_rounds_as_the_division_does():
    z = SIGMOID_ARGUMENTS.reshape(1, 1, 1, -1)
    weight = torch.ones(1, 1, 1, 1)
    pooled = CONV_EMULATED(z, weight, None, 0, 1, 2, 64)
    grad_z = CONV_BACKWARD_EMULATED(torch.ones_like(pooled), z, weight, None, 0, 1, [True, False, False], 2, 64)[0]
    check_tile_sigmoid(pooled, grad_z, SIGMOID_ARGUMENTS)
    assert (pooled.flatten()[SIGMOID_ARGUMENTS < -87] == 0).all()


def test_conv_tile_programs_empty_batch_and_bad_input():
    x, weight, bias, padding, pool = make_inputs(CASES["batch0"], torch.float32, "cpu")
    assert CONV_EMULATED(x, weight, bias, padding, pool, 4, 32).shape == (0, 6, 14, 14)
    grads = CONV_BACKWARD_EMULATED(torch.zeros(0, 6, 14, 14), x, weight, bias, padding, pool, [True] * 3, 4, 32)
    assert grads[0].shape == x.shape and not grads[1].any() and not grads[2].any()
    x, weight, bias, padding, pool = make_inputs(CASES["lenet_layer1"], torch.float32, "cpu")
    with pytest.raises(ValueError, match="expected 1 <= tile <= 1024, got 0"):
        CONV_EMULATED(x, weight, bias, padding, pool, 0, 32)
    with pytest.raises(ValueError, match="expected threads >= 1, got 0"):
        CONV_EMULATED(x, weight, bias, padding, pool, 2, 0)
    with pytest.raises(ValueError, match="channel mismatch"):
        CONV_EMULATED(x, weight[:, :0], bias, padding, pool, 2, 32)
    with pytest.raises(TypeError, match="float32 only"):
        CONV_EMULATED(x.double(), weight.double(), bias.double(), padding, pool, 2, 32)


@pytest.mark.parametrize("rows, columns", [(0, 5), (1, 1), (7, 33), (512, 64), (513, 70), (600_000, 3)])
def test_partial_sums_match_the_reference_whatever_the_block_size(rows, columns):
    """One pass up to 512 rows, two up to 512 * 512, three past that; the order of the
    additions is fixed by the rows alone, so any number of threads gives the same bits."""
    partials = torch.randn(rows, columns, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
    got = SUMS_EMULATED(partials.float(), 256)
    torch.testing.assert_close(got.double(), partials.float().double().sum(0), atol=1e-5 * max(rows, 1) ** 0.5, rtol=1e-5)
    assert torch.equal(got, SUMS_EMULATED(partials.float(), 33))
    if rows <= 513:
        assert torch.equal(got, SUMS_EMULATED(partials.float(), 1))


def test_partial_sums_bad_input():
    with pytest.raises(ValueError, match="expected a 2-d partials"):
        SUMS_EMULATED(torch.zeros(3), 32)
    with pytest.raises(TypeError, match="expected float32"):
        SUMS_EMULATED(torch.zeros(3, 2, dtype=torch.float64), 32)


@pytest.mark.parametrize(
    "race, error",
    [
        ("shared", "phase 0 depends on the order of its threads"),
        ("global", "output 0 depends on the order of the blocks and threads"),
        ("blocks", "output 0 depends on the order of the blocks and threads"),
        ("outside", "phase 0 writes outside its block's 8 floats of shared memory"),
    ],
)
def test_emulation_stops_at_a_race(race, error):
    """A small program with a race: a thread reading the shared memory another writes in the
    same phase, into shared or into global memory, or a block reading the next one's output;
    or with a write past its shared memory. Without them the same program runs, its read
    behind the barrier."""
    assert RACE_PROBE("none").tolist() == [2.0, 3.0, 4.0, 1.0] * 3
    with pytest.raises(RuntimeError, match=error):
        RACE_PROBE(race)
    with pytest.raises(ValueError, match="expected race none, shared, global, blocks or outside, got racy"):
        RACE_PROBE("racy")
