"""The d2l chapter's shape tools: the output-size formula and the layer table."""

from typing import Sequence, Tuple, Union

import torch
from torch import nn

from .ops import _as_int

__all__ = ["get_output_size", "summary"]

Size2 = Union[int, Sequence[int]]


def _pair(name: str, value: Size2) -> Tuple[int, int]:
    pair = tuple(_as_int(v) for v in value) if isinstance(value, (tuple, list)) else (_as_int(value),) * 2
    if len(pair) != 2 or None in pair:
        raise TypeError(f"get_output_size: expected {name} to be an int or a pair of ints, got {value!r}")
    return pair


def get_output_size(input_size: Size2, kernel_size: Size2, padding_size: Size2, slide_size: Size2) -> Tuple[int, int]:
    """Output (height, width) of a conv or pool: floor((n - k + p + s) / s) per dimension.

    As in the d2l chapter, padding_size is the total padding over both sides
    (padding=2 on each side is padding_size 4), and slide_size is the stride.
    """
    n, k, p, s = (_pair(name, v) for name, v in (
        ("input_size", input_size), ("kernel_size", kernel_size),
        ("padding_size", padding_size), ("slide_size", slide_size),
    ))  # fmt: skip
    if min(s) < 1:
        raise ValueError(f"get_output_size: expected slide_size >= 1, got {slide_size!r}")
    if min(p) < 0:
        raise ValueError(f"get_output_size: expected padding_size >= 0, got {padding_size!r}")
    size = tuple((n[d] - k[d] + p[d] + s[d]) // s[d] for d in range(2))
    if min(size) < 1:
        raise ValueError(
            f"get_output_size: kernel {kernel_size!r} does not fit input {input_size!r} with padding {padding_size!r}"
        )
    return size


def summary(model: nn.Module, input_size=(1, 1, 28, 28), print_fn=print) -> int:
    """Print the chapter's layer-by-layer table, with each layer's parameter count; returns the total.

    Runs the children of `model` one by one on a random input, as the
    chapter's loop does.
    """
    param = next(model.parameters(), None)
    x = torch.rand(
        size=tuple(input_size),
        dtype=param.dtype if param is not None else torch.float32,
        device=param.device if param is not None else "cpu",
    )
    total = 0
    with torch.no_grad():
        for layer in model.children():
            x = layer(x)
            count = sum(p.numel() for p in layer.parameters())
            total += count
            print_fn(f"{layer.__class__.__name__} output shape: \t {x.shape}\t params: {count}")
    print_fn(f"Total params: {total}")
    return total
