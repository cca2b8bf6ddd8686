"""Python side of the lenet_ext operators: wrappers, fake (meta) kernels and autograd.

Each operator's schema and argument checks are in csrc/ops/<name>.cpp, its
kernels in csrc/ops/cpu and csrc/ops/cuda under the same name.
"""

import operator
from collections import namedtuple
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["conv_sigmoid_avgpool2d"]

_INT64_MAX = 2**63 - 1  # the schemas' int


def conv_sigmoid_avgpool2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, padding: int = 0, pool: int = 2
) -> Tensor:
    """Fused ``avg_pool2d(sigmoid(conv2d(x, weight, bias, padding=padding)), pool, pool)``.

    x is (N, C_in, H, W); weight is (C_out, C_in, K, K) with a square kernel;
    bias is None or (C_out,). The convolution has stride 1 and ``padding``
    zeros on every side; the pool is non-overlapping and floors like PyTorch's.
    float32 and float64, on CPU and CUDA. The pre-pool activation is never
    stored: each pooled output is computed from x in one pass, and backward
    recomputes what it needs (see csrc/ops/autograd/conv_sigmoid_avgpool2d_autograd.cpp).
    """
    sizes = []
    for name, value in (("padding", padding), ("pool", pool)):
        size = _as_int(value)
        if size is None:
            raise TypeError(f"conv_sigmoid_avgpool2d: expected {name} to be an int, got {type(value).__name__}")
        if not -_INT64_MAX - 1 <= size <= _INT64_MAX:
            raise ValueError(f"conv_sigmoid_avgpool2d: expected {name} to fit in 64 bits, got {size}")
        sizes.append(size)
    return torch.ops.lenet_ext.conv_sigmoid_avgpool2d.default(x, weight, bias, *sizes)


def _as_int(value) -> Optional[int]:
    """value as an int when it is one, or an integer of another type (numpy's,
    anything with __index__) as torch's own size arguments take them; None
    for anything else, and for a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return None


def _output_shape(x, weight, bias, padding, pool):
    """Shape checks for the fake kernels, in the order and with the errors of
    check_forward_args in csrc/ops/conv_sigmoid_avgpool2d.cpp (the tests
    run one table of bad inputs through both)."""
    name = "conv_sigmoid_avgpool2d: "
    torch._check_value(x.dim() == 4, lambda: f"{name}expected x to be 4-d (N, C_in, H, W), got shape {tuple(x.shape)}")
    torch._check_value(
        weight.dim() == 4, lambda: f"{name}expected weight to be 4-d (C_out, C_in, K, K), got shape {tuple(weight.shape)}"
    )
    torch._check_type(
        x.dtype in (torch.float32, torch.float64), lambda: f"{name}expected x to be float32 or float64, got {x.dtype}"
    )
    torch._check_type(weight.dtype == x.dtype, lambda: f"{name}expected weight to have x's dtype {x.dtype}, got {weight.dtype}")
    torch._check_value(
        weight.device == x.device, lambda: f"{name}expected weight on x's device {x.device}, got {weight.device}"
    )
    n, c_in, h, w = x.shape
    c_out, w_in, k, k2 = weight.shape
    torch._check_value(c_in >= 1, lambda: f"{name}expected x to have at least one channel, got shape {tuple(x.shape)}")
    torch._check_value(
        c_out >= 1, lambda: f"{name}expected weight to have at least one output channel, got shape {tuple(weight.shape)}"
    )
    torch._check_value(w_in == c_in, lambda: f"{name}channel mismatch: x has {c_in} input channels but weight expects {w_in}")
    torch._check_value(k == k2, lambda: f"{name}expected a square kernel, got weight of shape {tuple(weight.shape)}")
    torch._check_value(k >= 1, lambda: f"{name}expected a kernel size >= 1, got weight of shape {tuple(weight.shape)}")
    if bias is not None:
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == c_out,
            lambda: f"{name}expected bias to be 1-d of size C_out = {c_out}, got shape {tuple(bias.shape)}",
        )
        torch._check_type(bias.dtype == x.dtype, lambda: f"{name}expected bias to have x's dtype {x.dtype}, got {bias.dtype}")
        torch._check_value(bias.device == x.device, lambda: f"{name}expected bias on x's device {x.device}, got {bias.device}")
    torch._check_value(padding >= 0, lambda: f"{name}expected padding >= 0, got {padding}")
    torch._check_value(  # padded_image_fits
        max(c_in, c_out) * (h + 2 * padding) * (w + 2 * padding) <= 2**56,
        lambda: f"{name}expected one image padded, max(C_in, C_out) x (H + 2 * padding) x (W + 2 * padding), to have "
        f"at most 2^56 elements, got padding {padding} for x of shape {list(x.shape)} and weight of shape {list(weight.shape)}",
    )
    torch._check_value(
        k <= h + 2 * padding and k <= w + 2 * padding,
        lambda: f"{name}kernel size {k} is larger than the padded input {h + 2 * padding}x{w + 2 * padding}",
    )
    conv_h, conv_w = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    torch._check_value(pool >= 1, lambda: f"{name}expected pool >= 1, got {pool}")
    torch._check_value(
        pool <= conv_h and pool <= conv_w, lambda: f"{name}pool {pool} is larger than the conv output {conv_h}x{conv_w}"
    )
    return n, c_out, conv_h // pool, conv_w // pool


@torch.library.register_fake("lenet_ext::conv_sigmoid_avgpool2d")
def _conv_sigmoid_avgpool2d_fake(x, weight, bias=None, padding=0, pool=2):
    return x.new_empty(_output_shape(x, weight, bias, padding, pool))


@torch.library.register_fake("lenet_ext::conv_sigmoid_avgpool2d_backward")
def _conv_sigmoid_avgpool2d_backward_fake(grad_out, x, weight, bias, padding, pool, output_mask):
    shape = _output_shape(x, weight, bias, padding, pool)
    name = "conv_sigmoid_avgpool2d_backward: "
    torch._check_value(
        tuple(grad_out.shape) == tuple(shape),
        lambda: f"{name}expected grad_out of shape {list(shape)}, got {tuple(grad_out.shape)}",
    )
    torch._check_type(
        grad_out.dtype == x.dtype, lambda: f"{name}expected grad_out to have x's dtype {x.dtype}, got {grad_out.dtype}"
    )
    torch._check_value(
        grad_out.device == x.device, lambda: f"{name}expected grad_out on x's device {x.device}, got {grad_out.device}"
    )
    need_x, need_weight, need_bias = output_mask
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None,
        torch.empty_like(bias) if need_bias and bias is not None else None,
    )


def reference_conv_sigmoid_avgpool2d(x, weight, bias=None, padding=0, pool=2):
    """What conv_sigmoid_avgpool2d computes, as differentiable PyTorch ops."""
    return F.avg_pool2d(torch.sigmoid(F.conv2d(x, weight, bias, padding=padding)), pool, pool)


# The operator's autograd kernel, whose backward is conv_sigmoid_avgpool2d_backward,
# and lenet_train_forward's, whose backward is lenet_backward, are C++
# (csrc/ops/autograd/): register_autograd's Python wrapper costs more per call
# than the kernels at small batches.


# --- LeNet as one operator (csrc/ops/lenet.cpp) -------------------------------

# The arguments of the three LeNet operators after x, as the schema names
# them; the Tensor ones (x and the parameters) get gradients.
_LENET_SCHEMA = torch.ops.lenet_ext.lenet_train_forward.default._schema
LENET_PARAMS = tuple(a.name for a in _LENET_SCHEMA.arguments[1:])
_LENET_TENSOR_ARGS = tuple(i for i, a in enumerate(_LENET_SCHEMA.arguments) if "Tensor" in str(a.type))
# The parameters by name: LeNetParams(*args[1:]).conv1_weight, ...
LeNetParams = namedtuple("LeNetParams", LENET_PARAMS)


def lenet_forward(*args) -> Tensor:
    """LeNet's inference in one call; args are (x, *LENET_PARAMS), as
    lenet_ext.model.lenet_args gives them."""
    return torch.ops.lenet_ext.lenet_forward.default(*args)


def lenet_train_forward(*args) -> Tensor:
    """LeNet's forward for training in one call, differentiable (its backward
    is lenet_backward); returns the logits."""
    return torch.ops.lenet_ext.lenet_train_forward.default(*args)[0]


def reference_lenet_forward(x, *params):
    """What the LeNet operators compute, as differentiable PyTorch ops."""
    p = LeNetParams(*params)
    h = reference_conv_sigmoid_avgpool2d(x, p.conv1_weight, p.conv1_bias, p.conv1_padding, p.pool1)
    h = reference_conv_sigmoid_avgpool2d(h, p.conv2_weight, p.conv2_bias, p.conv2_padding, p.pool2).flatten(1)
    h = torch.sigmoid(F.linear(h, p.fc1_weight, p.fc1_bias))
    h = torch.sigmoid(F.linear(h, p.fc2_weight, p.fc2_bias))
    return F.linear(h, p.fc3_weight, p.fc3_bias)


def _check_linear(op, x, weight, bias, name):
    """check_linear of csrc/ops/lenet.cpp."""
    features = x.shape[1]
    torch._check_value(
        weight.dim() == 2 and weight.shape[1] == features,
        lambda: f"{op}: expected {name}_weight of shape (out_features, {features}), got {tuple(weight.shape)}",
    )
    torch._check_type(weight.dtype == x.dtype, lambda: f"{op}: expected {name}_weight to have x's dtype {x.dtype}, got {weight.dtype}")
    torch._check_value(weight.device == x.device, lambda: f"{op}: expected {name}_weight on x's device {x.device}, got {weight.device}")
    if bias is None:
        return
    torch._check_value(
        bias.dim() == 1 and bias.shape[0] == weight.shape[0],
        lambda: f"{op}: expected {name}_bias to be 1-d of size out_features = {weight.shape[0]}, got shape {tuple(bias.shape)}",
    )
    torch._check_type(bias.dtype == x.dtype, lambda: f"{op}: expected {name}_bias to have x's dtype {x.dtype}, got {bias.dtype}")
    torch._check_value(bias.device == x.device, lambda: f"{op}: expected {name}_bias on x's device {x.device}, got {bias.device}")


def _lenet_activations(op, x, *params):
    """Empty (logits, block1, block2, fc1, fc2) as lenet_train_forward returns them; checks the arguments."""
    p = LeNetParams(*params)
    block1 = x.new_empty(_output_shape(x, p.conv1_weight, p.conv1_bias, p.conv1_padding, p.pool1))
    n, c, h, w = _output_shape(block1, p.conv2_weight, p.conv2_bias, p.conv2_padding, p.pool2)
    outs = [block1, x.new_empty((n, c * h * w))]
    for name in ("fc1", "fc2", "fc3"):
        weight, bias = getattr(p, f"{name}_weight"), getattr(p, f"{name}_bias")
        _check_linear(op, outs[-1], weight, bias, name)
        outs.append(x.new_empty((n, weight.shape[0])))
    block1, block2, fc1, fc2, logits = outs
    return logits, block1, block2, fc1, fc2


@torch.library.register_fake("lenet_ext::lenet_forward")
def _lenet_forward_fake(x, *params):
    return _lenet_activations("lenet_forward", x, *params)[0]


@torch.library.register_fake("lenet_ext::lenet_train_forward")
def _lenet_train_forward_fake(x, *params):
    return _lenet_activations("lenet_train_forward", x, *params)


@torch.library.register_fake("lenet_ext::lenet_backward")
def _lenet_backward_fake(grad_logits, x, block1, block2, fc1, fc2, *params_and_mask):
    *params, output_mask = params_and_mask
    want = _lenet_activations("lenet_backward", x, *params)
    saved = {"grad_logits": grad_logits, "block1": block1, "block2": block2, "fc1": fc1, "fc2": fc2}
    for name, got in saved.items():
        torch._check_type(got.dtype == x.dtype, lambda: f"lenet_backward: expected {name} to have x's dtype {x.dtype}, got {got.dtype}")
        torch._check_value(got.device == x.device, lambda: f"lenet_backward: expected {name} on x's device {x.device}, got {got.device}")
    for (name, got), expected in zip(saved.items(), want):
        torch._check_value(
            tuple(got.shape) == tuple(expected.shape),
            lambda: f"lenet_backward: expected {name} of shape {list(expected.shape)}, got {tuple(got.shape)}",
        )
    tensors = [(x, *params)[i] for i in _LENET_TENSOR_ARGS]
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else None
        for t, need in zip(tensors, output_mask)
    )



# --- Autocast -------------------------------------------------------------------
#
# Under torch.autocast every operator computes in float32 (float64 inputs stay
# float64, as autocast leaves them) and casts its results as the reference
# model's would come out: the forward outputs in autocast's dtype (the
# reference's convolutions and Linear layers run in it), each gradient in its
# input's dtype. The kernels sit above autograd, so autograd sees the casts
# and the parameters' gradients come in the parameters' dtype; the fake
# kernels see only float32 or float64 and need no autocast rules of their own.

_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA
)


def _to_float32(arg):
    if isinstance(arg, Tensor) and arg.is_floating_point() and arg.dtype != torch.float64:
        return arg.to(torch.float32)
    return arg


def _autocast_output(result, low_precision):
    return result.to(low_precision) if result is not None and result.dtype == torch.float32 else result


def _as_forward_output(args, results, low_precision):
    return _autocast_output(results, low_precision)


def _as_train_forward_output(args, results, low_precision):
    logits, *activations = results  # the activations are for lenet_backward only: float32 stays
    return (_autocast_output(logits, low_precision), *activations)


def _as_gradients_of(first_input, tensor_positions):
    """Each gradient in the dtype of the input it belongs to."""

    def cast(args, grads, low_precision):
        inputs = [args[first_input + i] for i in tensor_positions]
        return tuple(g if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))

    return cast


_AUTOCAST_OUTPUTS = {
    "conv_sigmoid_avgpool2d": _as_forward_output,
    "conv_sigmoid_avgpool2d_backward": _as_gradients_of(1, (0, 1, 2)),  # after grad_out: x, weight, bias
    "lenet_forward": _as_forward_output,
    "lenet_train_forward": _as_train_forward_output,
    "lenet_backward": _as_gradients_of(5, _LENET_TENSOR_ARGS),  # after grad_logits and the four activations
}


def _autocast_kernel(name, device_type):
    op = getattr(torch.ops.lenet_ext, name).default
    cast_outputs = _AUTOCAST_OUTPUTS[name]

    # The dispatcher passes the schema's arguments positionally (ours has no
    # keyword-only ones), trailing defaults possibly left out.
    def kernel(_keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            results = op(*map(_to_float32, args))
        return cast_outputs(args, results, torch.get_autocast_dtype(device_type))

    return kernel


_autocast_library = torch.library.Library("lenet_ext", "IMPL")
for _name in _AUTOCAST_OUTPUTS:
    _autocast_library.impl(_name, _autocast_kernel(_name, "cpu"), "AutocastCPU", with_keyset=True)
    _autocast_library.impl(_name, _autocast_kernel(_name, "cuda"), "AutocastCUDA", with_keyset=True)
