"""Each bad argument gets an error that names it; none crashes or computes."""

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lenet_ext.ops import conv_sigmoid_avgpool2d

from conftest import DEVICES, requires_cuda


def lenet_layer2(**overrides):
    args = dict(
        x=torch.randn(2, 6, 14, 14),
        weight=torch.randn(16, 6, 5, 5),
        bias=torch.randn(16),
        padding=0,
        pool=2,
    )
    args.update(overrides)
    return args


BAD_INPUTS = {
    "x_not_4d": (lenet_layer2(x=torch.randn(6, 14, 14)), ValueError, r"x to be 4-d"),
    "weight_not_4d": (lenet_layer2(weight=torch.randn(16, 6, 25)), ValueError, r"weight to be 4-d"),
    "channel_mismatch": (lenet_layer2(x=torch.randn(2, 3, 14, 14)), ValueError, r"channel mismatch: x has 3 input channels but weight expects 6"),
    "non_square_kernel": (lenet_layer2(weight=torch.randn(16, 6, 5, 3)), ValueError, r"square kernel"),
    "bias_2d": (lenet_layer2(bias=torch.randn(16, 1)), ValueError, r"bias to be 1-d of size C_out = 16"),
    "bias_wrong_size": (lenet_layer2(bias=torch.randn(15)), ValueError, r"bias to be 1-d of size C_out = 16"),
    "mixed_dtypes": (lenet_layer2(weight=torch.randn(16, 6, 5, 5, dtype=torch.float64)), TypeError, r"weight to have x's dtype"),
    "bias_dtype": (lenet_layer2(bias=torch.randn(16, dtype=torch.float64)), TypeError, r"bias to have x's dtype"),
    # torch's conv2d lets mixed dtypes through when the batch is empty; lenet_ext refuses them always.
    "mixed_dtypes_empty_batch": (
        lenet_layer2(x=torch.randn(0, 6, 14, 14), weight=torch.randn(16, 6, 5, 5, dtype=torch.float64), bias=None),
        TypeError,
        r"weight to have x's dtype",
    ),
    "integer_x": (
        lenet_layer2(x=torch.ones(2, 6, 14, 14, dtype=torch.int32), weight=torch.ones(16, 6, 5, 5, dtype=torch.int32), bias=None),
        TypeError,
        r"x to be float32 or float64, got (Int|torch.int32)",
    ),
    "half_x": (
        lenet_layer2(x=torch.randn(2, 6, 14, 14).half(), weight=torch.randn(16, 6, 5, 5).half(), bias=None),
        TypeError,
        r"x to be float32 or float64, got (Half|torch.float16)",
    ),
    "kernel_larger_than_padded_input": (
        lenet_layer2(x=torch.randn(2, 6, 4, 4), padding=0), ValueError, r"kernel size 5 is larger than the padded input 4x4"
    ),
    "negative_padding": (lenet_layer2(padding=-1), ValueError, r"padding >= 0, got -1"),
    "pool_zero": (lenet_layer2(pool=0), ValueError, r"pool >= 1, got 0"),
    # The padded sizes' sums and products would wrap around an int64.
    "padding_past_int64_sizes": (lenet_layer2(padding=2**63 - 1), ValueError, r"at most 2\^56 elements, got padding 9223372036854775807"),
    "padding_past_2_56_elements": (lenet_layer2(padding=2**26), ValueError, r"at most 2\^56 elements, got padding 67108864"),
    "empty_batch_of_vast_images": (
        lenet_layer2(x=torch.empty(0, 6, 2**29, 2**29)), ValueError, r"at most 2\^56 elements, got padding 0 for x of shape \[0, 6, 536870912, 536870912\]"
    ),
    "pool_larger_than_conv_output": (lenet_layer2(pool=11), ValueError, r"pool 11 is larger than the conv output 10x10"),
    "empty_kernel": (lenet_layer2(weight=torch.randn(16, 6, 0, 0)), ValueError, r"kernel size >= 1"),
    "no_out_channels": (lenet_layer2(weight=torch.randn(0, 6, 5, 5), bias=torch.randn(0)), ValueError, r"at least one output channel"),
    "no_in_channels": (
        lenet_layer2(x=torch.randn(2, 0, 14, 14), weight=torch.randn(16, 0, 5, 5)), ValueError, r"x to have at least one channel"
    ),
}


def _backward_args(kwargs):
    """The backward operator's arguments for the same bad input; grad_out is a stand-in that the forward checks never reach."""
    return (torch.zeros(1, device=kwargs["x"].device, dtype=kwargs["x"].dtype), kwargs["x"], kwargs["weight"],
            kwargs["bias"], kwargs["padding"], kwargs["pool"], [True, True, True])  # fmt: skip


def _on(device, kwargs):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


PATHS = ["operator", "backward_operator", "meta", "meta_backward", "fake_mode"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_one_table_through_every_path(case, path, device):
    """The C++ checks and the fake kernels raise the same error for each bad input: drift between them fails here."""
    kwargs, error, message = case
    kwargs = _on("meta" if path.startswith("meta") else device, kwargs)
    with pytest.raises(error, match=message):
        if path in ("operator", "meta"):
            torch.ops.lenet_ext.conv_sigmoid_avgpool2d.default(*kwargs.values())
        elif path in ("backward_operator", "meta_backward"):
            torch.ops.lenet_ext.conv_sigmoid_avgpool2d_backward.default(*_backward_args(kwargs))
        else:
            with FakeTensorMode() as mode:
                fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                torch.ops.lenet_ext.conv_sigmoid_avgpool2d.default(*fake.values())


@pytest.mark.parametrize("case", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_raises_a_named_error(case):
    """Through the Python wrapper, as users call it."""
    kwargs, error, message = case
    with pytest.raises(error, match=message):
        conv_sigmoid_avgpool2d(**kwargs)


@pytest.mark.parametrize("name", ["padding", "pool"])
def test_non_integer_sizes(name):
    with pytest.raises(TypeError, match=f"expected {name} to be an int, got float"):
        conv_sigmoid_avgpool2d(**lenet_layer2(**{name: 2.0}))
    # torch.ops goes through the schema, which also names the argument.
    args = lenet_layer2(**{name: 2.0})
    with pytest.raises(RuntimeError, match=f"type 'int' for argument '{name}'"):
        torch.ops.lenet_ext.conv_sigmoid_avgpool2d(*args.values())
    with pytest.raises(TypeError, match=f"expected {name} to be an int, got bool"):
        conv_sigmoid_avgpool2d(**lenet_layer2(**{name: True}))


@pytest.mark.parametrize("name", ["padding", "pool"])
@pytest.mark.parametrize("value", [2**63, -(2**63) - 1])
def test_sizes_past_64_bits(name, value):
    """The schema's ints are int64_t; the wrapper names the argument where the schema's own error would not."""
    with pytest.raises(ValueError, match=f"expected {name} to fit in 64 bits, got {value}"):
        conv_sigmoid_avgpool2d(**lenet_layer2(**{name: value}))


class Index:
    """An integer of a type of its own, as numpy's are: int() of it is its __index__."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value


@pytest.mark.parametrize("integer", [np.int64, np.int32, Index], ids=["int64", "int32", "__index__"])
def test_integer_sizes_of_other_types(integer):
    """Sizes as torch's own take them: any integer type."""
    args = lenet_layer2(padding=1)
    expected = conv_sigmoid_avgpool2d(**args)
    got = conv_sigmoid_avgpool2d(**{**args, "padding": integer(1), "pool": integer(2)})
    assert torch.equal(got, expected)


def test_backward_checks_grad_out_shape():
    args = lenet_layer2()
    with pytest.raises(ValueError, match=r"grad_out of shape \[2, 16, 5, 5\]"):
        torch.ops.lenet_ext.conv_sigmoid_avgpool2d_backward(
            torch.randn(2, 16, 4, 4), args["x"], args["weight"], args["bias"], 0, 2, [True, True, True]
        )


@requires_cuda
@pytest.mark.parametrize("moved", ["weight", "bias"])
def test_tensors_on_different_devices(moved):
    args = lenet_layer2()
    args = lenet_layer2(**{moved: args[moved].cuda()})
    with pytest.raises(ValueError, match=rf"{moved} on x's device cpu, got cuda"):
        conv_sigmoid_avgpool2d(**args)


def test_tensors_on_different_devices_meta():
    """The device check, exercised without a GPU: a meta weight beside a CPU x."""
    with pytest.raises((ValueError, RuntimeError), match=r"weight on x's device cpu"):
        conv_sigmoid_avgpool2d(**lenet_layer2(weight=torch.randn(16, 6, 5, 5, device="meta")))
