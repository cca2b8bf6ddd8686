"""LeNet-5 as in d2l: a drop-in for its nn.Sequential, with fused conv blocks."""

from collections import OrderedDict

from torch import nn

from .fuse import FusedSequential

__all__ = ["LeNet", "reference_lenet"]

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


def reference_lenet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Sequential:
    """The d2l model as a plain nn.Sequential: the reference LeNet is checked against."""
    return nn.Sequential(*_lenet_layers(num_classes, in_channels, image_size))


class LeNet(FusedSequential):
    """LeNet-5, layer for layer the d2l nn.Sequential, with each conv block fused.

    Same 12 children, same state_dict (either loads into the other), same
    printed layers; forward runs Conv2d -> Sigmoid -> AvgPool2d through
    lenet_ext.ops.conv_sigmoid_avgpool2d. image_size=32 is LeCun's original
    input, with no padding on the first conv.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__(*_lenet_layers(num_classes, in_channels, image_size))

    def __getitem__(self, idx):
        # A slice is no longer a whole LeNet; keep its layers, and its fusion.
        if isinstance(idx, slice):
            return FusedSequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def extra_repr(self) -> str:
        # Print exactly the reference's layers; fused_runs() tells what is fused.
        return ""
