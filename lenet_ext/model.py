"""LeNet-5 as in d2l: a drop-in for its nn.Sequential, with fused conv blocks."""

from collections import OrderedDict

import torch
from torch import Tensor, nn

from . import ops
from .fuse import _FUSED_DEVICES, _FUSED_DTYPES, FusedSequential, _conv_padding, _global_hooks, _square, fusable_config

__all__ = ["LeNet", "reference_lenet", "lenet_args"]

# First-conv padding for each supported input size; both give a 16x5x5 = 400-wide dense block.
_FIRST_PADDING = {28: 2, 32: 0}


def _lenet_layers(num_classes: int, in_channels: int, image_size: int):
    if image_size not in _FIRST_PADDING:
        raise ValueError(f"LeNet: image_size must be 28 (d2l, padding 2) or 32 (LeCun's original), got {image_size}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"LeNet: num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")
    return (
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=_FIRST_PADDING[image_size]), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, num_classes),
    )  # fmt: skip


_LENET_TYPES = (
    nn.Conv2d, nn.Sigmoid, nn.AvgPool2d, nn.Conv2d, nn.Sigmoid, nn.AvgPool2d,
    nn.Flatten, nn.Linear, nn.Sigmoid, nn.Linear, nn.Sigmoid, nn.Linear,
)  # fmt: skip


def _is_reference_layout(layers) -> bool:
    """Whether the 12 layers still are the reference's kinds, so that lenet_forward computes them."""
    if tuple(map(type, layers)) != _LENET_TYPES:
        return False
    for m in layers:  # inline: at batch 1 this check is a visible part of the forward
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
    flatten = layers[6]
    return (
        fusable_config(layers[0], layers[2])
        and fusable_config(layers[3], layers[5])
        and flatten.start_dim == 1
        and flatten.end_dim == -1
        and not _global_hooks()
    )


def lenet_args(x: Tensor, layers) -> tuple:
    """The LeNet operators' arguments, (x, *ops.LENET_PARAMS), from LeNet's 12
    layers as they are now (Conv2d and AvgPool2d as fusable_config accepts)."""
    conv1, _, pool1, conv2, _, pool2, _, fc1, _, fc2, _, fc3 = layers
    return (
        x, conv1.weight, conv1.bias, _conv_padding(conv1), _square(pool1.kernel_size),
        conv2.weight, conv2.bias, _conv_padding(conv2), _square(pool2.kernel_size),
        fc1.weight, fc1.bias, fc2.weight, fc2.bias, fc3.weight, fc3.bias,
    )  # fmt: skip


def _records_gradients(x: Tensor, layers) -> bool:
    return x.requires_grad or any(p.requires_grad for m in layers for p in m._parameters.values() if p is not None)


def reference_lenet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Sequential:
    """The d2l model as a plain nn.Sequential: the reference LeNet is checked against."""
    return nn.Sequential(*_lenet_layers(num_classes, in_channels, image_size))


class LeNet(FusedSequential):
    """LeNet-5, layer for layer the d2l nn.Sequential, with each conv block fused.

    Same 12 children, same state_dict (either loads into the other), same
    printed layers. While the layers are the reference's, forward is one
    operator call for the whole network (lenet_ext::lenet_forward, or
    lenet_train_forward with its backward lenet_backward when autograd
    records); a layer replaced or hooked sends it through the layers, with
    each Conv2d -> Sigmoid -> AvgPool2d run by
    lenet_ext.ops.conv_sigmoid_avgpool2d. image_size=32 is LeCun's original
    input, with no padding on the first conv.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__(*_lenet_layers(num_classes, in_channels, image_size))
        self.image_size = image_size

    def forward(self, x: Tensor) -> Tensor:
        # The whole network is one operator call, and with autograd one graph
        # node: at small batches the dispatches, not the arithmetic, are most
        # of the time, and at large ones a tile of images stays in cache
        # through all the layers.
        if torch.onnx.is_in_onnx_export():  # ONNX has no lenet_ext operators: export the plain layers
            return nn.Sequential.forward(self, x)
        if x.dtype in _FUSED_DTYPES and x.device.type in _FUSED_DEVICES:
            layers = tuple(self._modules.values())
            if x.dim() == 4 and _is_reference_layout(layers):
                args = lenet_args(x, layers)
                try:
                    if torch.is_grad_enabled() and _records_gradients(x, layers):
                        return ops.lenet_train_forward(*args)
                    return ops.lenet_forward(*args)
                except ValueError as e:
                    self._check_input(x, e)
                    raise
            if x.dim() != 4 and _is_reference_layout(layers):
                self._check_input(x, None)
        return super().forward(x)

    def _check_input(self, x: Tensor, error) -> None:
        """Raises the error a user needs when x's shape, not a layer, is what does not fit."""
        expected = (self[0].in_channels, self.image_size, self.image_size)
        if x.dim() == 4 and tuple(x.shape[1:]) == expected:
            return
        raise ValueError(
            f"LeNet(in_channels={expected[0]}, image_size={self.image_size}) expects input of shape "
            f"(N, {expected[0]}, {self.image_size}, {self.image_size}) (batch, channels, height, width), "
            f"got {tuple(x.shape)}"
            + (". A single image needs its batch dimension: x.unsqueeze(0)." if x.dim() == 3 else "")
        ) from error

    def __getitem__(self, idx):
        # A slice is no longer a whole LeNet; keep its layers, and its fusion.
        if isinstance(idx, slice):
            return FusedSequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def extra_repr(self) -> str:
        # Print exactly the reference's layers; fused_runs() tells what is fused.
        return ""
