"""Property-based tests: random shapes, layouts and dtypes against the float64 PyTorch reference.

Profiles (tests/conftest.py): "ci" by default, "long" for a deep run:
    pytest tests/test_properties.py --hypothesis-profile=long
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from lenet_ext import LeNet
from lenet_ext.ops import conv_sigmoid_avgpool2d, reference_conv_sigmoid_avgpool2d

TOLERANCES = {
    torch.float64: dict(atol=1e-11, rtol=1e-9),
    torch.float32: dict(atol=3e-5, rtol=3e-4),
}

LAYOUTS = ["contiguous", "channels_last", "non_contiguous"]


def laid_out(t, layout):
    """t with the same values in another memory layout."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        wide = torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)
        return wide[..., 0]  # every other element of a buffer twice the size
    return t


@st.composite
def conv_inputs(draw):
    """Arguments for the operator: mostly valid, some deliberately not (sizes that do not fit, mismatched dtypes)."""
    batch = draw(st.sampled_from([0, 1, 2, 3, 5]))
    # Now and then no channels at all, which torch's conv2d refuses; more than
    # 16 output channels make a second block of channel lanes.
    c_in = draw(st.sampled_from([0] + [1, 2, 3, 4] * 3))
    c_out = draw(st.sampled_from(range(21)))
    kernel = draw(st.integers(1, 6))
    padding = draw(st.integers(0, 3))
    pool = draw(st.integers(1, 4))
    height = draw(st.integers(1, 16))
    width = draw(st.integers(1, 16))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    with_bias = draw(st.booleans())
    weight_dtype = draw(st.sampled_from([dtype] * 9 + [torch.float64 if dtype == torch.float32 else torch.float32]))
    layouts = draw(st.tuples(*[st.sampled_from(LAYOUTS)] * 3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, height, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=gen, dtype=torch.float64) / kernel
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64) if with_bias else None
    return dict(x=x, weight=weight, bias=bias, padding=padding, pool=pool, dtype=dtype, weight_dtype=weight_dtype, layouts=layouts)


def reference_or_error(x, weight, bias, padding, pool):
    try:
        return reference_conv_sigmoid_avgpool2d(x, weight, bias, padding, pool), None
    except Exception as e:  # noqa: BLE001  (the reference's own error, whatever its type)
        return None, e


@given(conv_inputs())
def test_operator_matches_the_reference_or_raises_where_it_does(case):
    dtype, layouts = case["dtype"], case["layouts"]
    x = laid_out(case["x"].to(dtype), layouts[0])
    weight = laid_out(case["weight"].to(case["weight_dtype"]), layouts[1])
    bias = None if case["bias"] is None else laid_out(case["bias"].to(case["weight_dtype"]), layouts[2])
    padding, pool = case["padding"], case["pool"]
    note(f"x {tuple(x.shape)} {x.dtype} {layouts}, weight {tuple(weight.shape)} {weight.dtype}, padding {padding}, pool {pool}")

    ref_out, ref_error = reference_or_error(x, weight, bias, padding, pool)
    # Mixed dtypes are refused always; torch's conv2d lets them through when
    # the batch is empty.
    invalid = ref_error is not None or weight.dtype != x.dtype
    event("invalid: the reference raises, or mixed dtypes" if invalid else "valid")
    if invalid:
        with pytest.raises((ValueError, TypeError)):
            conv_sigmoid_avgpool2d(x, weight, bias, padding, pool)
        with FakeTensorMode() as mode, pytest.raises((ValueError, TypeError)):
            conv_sigmoid_avgpool2d(mode.from_tensor(x), mode.from_tensor(weight), bias if bias is None else mode.from_tensor(bias), padding, pool)
        return

    tensors = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = conv_sigmoid_avgpool2d(*tensors, *([None] if bias is None else []), padding, pool)
    with FakeTensorMode() as mode:
        fake = conv_sigmoid_avgpool2d(*(mode.from_tensor(t) for t in (x, weight)), bias if bias is None else mode.from_tensor(bias), padding, pool)
    assert fake.shape == out.shape == ref_out.shape and fake.dtype == out.dtype == dtype

    ref_tensors = [t.detach().double().requires_grad_() for t in tensors]
    ref_out = reference_conv_sigmoid_avgpool2d(*ref_tensors, *([None] if bias is None else []), padding, pool)
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[dtype])
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, tensors, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref_out, ref_tensors, grad_out)
    for got, want, t in zip(grads, ref_grads, tensors):
        assert got.shape == t.shape and got.dtype == t.dtype
        torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])


# A whole network per example: a fifth of the profile's examples.
@settings(max_examples=max(1, settings.default.max_examples // 5))
@given(
    batch=st.sampled_from([0, 1, 2, 7, 65, 130]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    layout=st.sampled_from(LAYOUTS),
    mode=st.sampled_from(["train", "inference"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_lenet_matches_the_reference(batch, dtype, layout, mode, seed):
    """The whole network, including the tiled batches and the empty one, in both modes."""
    torch.manual_seed(seed)
    net = LeNet().to(dtype)
    ref = torch.nn.Sequential(*LeNet()).double()
    ref.load_state_dict(net.state_dict())
    x = laid_out(torch.rand(batch, 1, 28, 28, dtype=dtype), layout)
    if mode == "inference":
        with torch.inference_mode():
            torch.testing.assert_close(net(x).double(), ref(x.double()), **TOLERANCES[dtype])
        return
    target = torch.randint(0, 10, (batch,))
    F.cross_entropy(net(x), target, reduction="sum").backward()
    F.cross_entropy(ref(x.double()), target, reduction="sum").backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=TOLERANCES[dtype]["atol"] * max(1, batch), rtol=TOLERANCES[dtype]["rtol"] * 10)
