"""Python side of the lenet_ext operators: wrappers, fake (meta) kernels and autograd.

The operators themselves are defined in C++ (csrc/lenet_ext.cpp) with kernels
in csrc/ops/cpu and csrc/ops/cuda.
"""

from typing import Optional

import torch
from torch import Tensor

__all__ = ["conv_sigmoid_avgpool2d"]


def conv_sigmoid_avgpool2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, padding: int = 0, pool: int = 2
) -> Tensor:
    """Fused ``avg_pool2d(sigmoid(conv2d(x, weight, bias, padding=padding)), pool, pool)``.

    x is (N, C_in, H, W); weight is (C_out, C_in, K, K) with a square kernel;
    bias is None or (C_out,). The convolution has stride 1 and ``padding``
    zeros on every side; the pool is non-overlapping and floors like PyTorch's.
    float32 and float64, on CPU and CUDA. The pre-pool activation is never
    stored: each pooled output is computed from x in one pass, and backward
    recomputes what it needs (see _setup_context).
    """
    for name, value in (("padding", padding), ("pool", pool)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"conv_sigmoid_avgpool2d: expected {name} to be an int, got {type(value).__name__}")
    return torch.ops.lenet_ext.conv_sigmoid_avgpool2d.default(x, weight, bias, padding, pool)


def _output_shape(x, weight, bias, padding, pool):
    """Shape checks for the fake kernels; they mirror csrc/ops/conv_sigmoid_avgpool2d_host.cpp."""
    name = "conv_sigmoid_avgpool2d: "
    torch._check_value(x.dim() == 4, lambda: f"{name}expected x to be 4-d (N, C_in, H, W), got shape {tuple(x.shape)}")
    torch._check_value(
        weight.dim() == 4, lambda: f"{name}expected weight to be 4-d (C_out, C_in, K, K), got shape {tuple(weight.shape)}"
    )
    torch._check_type(
        x.dtype in (torch.float32, torch.float64), lambda: f"{name}expected x to be float32 or float64, got {x.dtype}"
    )
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        torch._check_type(t.dtype == x.dtype, lambda: f"{name}expected {arg} to have x's dtype {x.dtype}, got {t.dtype}")
        torch._check_value(t.device == x.device, lambda: f"{name}expected {arg} on x's device {x.device}, got {t.device}")
    n, c_in, h, w = x.shape
    c_out, w_in, k, k2 = weight.shape
    torch._check_value(w_in == c_in, lambda: f"{name}channel mismatch: x has {c_in} input channels but weight expects {w_in}")
    torch._check_value(k == k2, lambda: f"{name}expected a square kernel, got weight of shape {tuple(weight.shape)}")
    if bias is not None:
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == c_out,
            lambda: f"{name}expected bias to be 1-d of size C_out = {c_out}, got shape {tuple(bias.shape)}",
        )
    torch._check_value(padding >= 0, lambda: f"{name}expected padding >= 0, got {padding}")
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
    torch._check_value(
        tuple(grad_out.shape) == tuple(shape),
        lambda: f"conv_sigmoid_avgpool2d_backward: expected grad_out of shape {tuple(shape)}, got {tuple(grad_out.shape)}",
    )
    need_x, need_weight, need_bias = output_mask
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None,
        torch.empty_like(bias) if need_bias and bias is not None else None,
    )


# Values of the schema's trailing defaults (bias, padding, pool): the
# dispatcher drops trailing arguments equal to their defaults from `inputs`.
_FORWARD_DEFAULTS = (None, 0, 2)


def _setup_context(ctx, inputs, output):
    # Saved: x and the parameters, nothing of the activation. nn.Sequential
    # keeps x plus the sigmoid output (the input of the pool), which is
    # C_out * H_conv * W_conv per image -- six times x for LeNet's first layer.
    # Backward recomputes z = conv(x) + bias instead: a second forward-sized
    # convolution in exchange for never storing the pre-pool activation.
    x, weight, bias, padding, pool = tuple(inputs) + _FORWARD_DEFAULTS[len(inputs) - 2 :]
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(x, weight, bias)
    ctx.padding = padding
    ctx.pool = pool


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    mask = [bool(need) for need in (tuple(ctx.needs_input_grad) + (False,))[:3]]
    grads = torch.ops.lenet_ext.conv_sigmoid_avgpool2d_backward.default(
        grad_out, x, weight, bias, ctx.padding, ctx.pool, mask
    )
    # One entry per input the op received; padding and pool get none.
    return (tuple(grads) + (None, None))[: ctx.num_inputs]


torch.library.register_autograd(
    "lenet_ext::conv_sigmoid_avgpool2d", _backward, setup_context=_setup_context
)


# --- LeNet as one operator (csrc/ops/lenet.cpp) -------------------------------

# Positions of lenet_train_forward's tensor arguments (x and the parameters);
# the others are the conv blocks' paddings and pools.
_LENET_TENSOR_ARGS = (0, 1, 2, 5, 6, 9, 10, 11, 12, 13, 14)


def _lenet_activations(op, x, conv1_weight, conv1_bias, conv1_padding, pool1, conv2_weight, conv2_bias,
                       conv2_padding, pool2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc3_weight, fc3_bias):
    """Empty (logits, block1, block2, fc1, fc2) as lenet_train_forward returns them; checks the shapes."""
    block1 = x.new_empty(_output_shape(x, conv1_weight, conv1_bias, conv1_padding, pool1))
    n, c, h, w = _output_shape(block1, conv2_weight, conv2_bias, conv2_padding, pool2)
    outs = [block1, x.new_empty((n, c * h * w))]
    for name, weight in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight), ("fc3_weight", fc3_weight)):
        features = outs[-1].shape[1]
        torch._check_value(
            weight.dim() == 2 and weight.shape[1] == features,
            lambda: f"{op}: expected {name} of shape (out_features, {features}), got {tuple(weight.shape)}",
        )
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
    for (name, got), expected in zip(saved.items(), want):
        torch._check_value(
            tuple(got.shape) == tuple(expected.shape),
            lambda: f"lenet_backward: expected {name} of shape {tuple(expected.shape)}, got {tuple(got.shape)}",
        )
    tensors = [(x, *params)[i] for i in _LENET_TENSOR_ARGS]
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else None
        for t, need in zip(tensors, output_mask)
    )


def _lenet_setup_context(ctx, inputs, output):
    # Saved: x and the inputs of the later layers with weights (the two conv
    # blocks' outputs, the two hidden sigmoids), as nn.Sequential saves them,
    # but not the sigmoid outputs inside the conv blocks: lenet_backward
    # recomputes those tile by tile (see conv_sigmoid_avgpool2d's backward).
    _, block1, block2, fc1, fc2 = output
    ctx.mark_non_differentiable(block1, block2, fc1, fc2)
    # Backward reads only grad_logits; the engine need not make zero
    # gradients for the activations.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(block1, block2, fc1, fc2, *(inputs[i] for i in _LENET_TENSOR_ARGS))
    ctx.args = [None if i in _LENET_TENSOR_ARGS else value for i, value in enumerate(inputs)]


def _lenet_backward(ctx, grad_logits, *_activation_grads):
    if grad_logits is None:
        return (None,) * len(ctx.args)
    block1, block2, fc1, fc2, *tensors = ctx.saved_tensors
    args = list(ctx.args)
    for i, tensor in zip(_LENET_TENSOR_ARGS, tensors):
        args[i] = tensor
    x, *params = args
    mask = [bool(ctx.needs_input_grad[i]) for i in _LENET_TENSOR_ARGS]
    grads = iter(torch.ops.lenet_ext.lenet_backward.default(grad_logits, x, block1, block2, fc1, fc2, *params, mask))
    # One entry per argument; the ints get None.
    return tuple(next(grads) if i in _LENET_TENSOR_ARGS else None for i in range(len(args)))


torch.library.register_autograd(
    "lenet_ext::lenet_train_forward", _lenet_backward, setup_context=_lenet_setup_context
)
