"""LeNet-5 as in d2l: a drop-in for its nn.Sequential, with fused conv blocks."""

from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from . import _C, ops
from .fuse import (
    _FUSED_DTYPES,
    _GLOBAL_HOOK_DICTS,
    _HOOK_DICTS,
    FusedSequential,
    _as_scriptable,
    _conv_padding,
    _forward_replaced,
    _functorch_transforms_active,
    _global_hooks,
    _square,
    fusable_config,
)

__all__ = ["LeNet", "reference_lenet", "lenet_args"]

_LENET_FORWARD = torch.ops.lenet_ext.lenet_forward.default
_unchanged = _C.unchanged
_tracing_state = torch._C._get_tracing_state  # TorchScript's tracer: None unless tracing

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


# Every attribute that _operator_config reads, by layer index: while these
# compare equal, so does what it decides.
_CONV_CONFIG = ("stride", "dilation", "groups", "padding_mode", "kernel_size", "padding")
_POOL_CONFIG = ("kernel_size", "stride", "padding", "ceil_mode", "divisor_override")
_CONFIG_ATTRIBUTES = ((0, _CONV_CONFIG), (2, _POOL_CONFIG), (3, _CONV_CONFIG), (5, _POOL_CONFIG), (6, ("start_dim", "end_dim")))
_PARAMETER_LAYERS = (0, 3, 7, 9, 11)


def _config_key(layers: tuple) -> tuple:
    return tuple(getattr(layers[i], name) for i, names in _CONFIG_ATTRIBUTES for name in names)


def _operator_config(conv1, pool1, conv2, pool2, flatten) -> Optional[tuple]:
    """(conv1_padding, pool1, conv2_padding, pool2) for the operators, or None
    when a conv block or the flatten is configured otherwise than they compute."""
    if not (fusable_config(conv1, pool1) and fusable_config(conv2, pool2)):
        return None
    if flatten.start_dim != 1 or flatten.end_dim != -1:
        return None
    return _conv_padding(conv1), _square(pool1.kernel_size), _conv_padding(conv2), _square(pool2.kernel_size)


def _args_from(x: Tensor, layers: tuple, config: tuple) -> tuple:
    conv1, _, _, conv2, _, _, _, fc1, _, fc2, _, fc3 = layers
    padding1, size1, padding2, size2 = config
    try:  # the registered parameters, without nn.Module.__getattr__'s cost (nor a generator's)
        c1, c2, f1, f2, f3 = conv1._parameters, conv2._parameters, fc1._parameters, fc2._parameters, fc3._parameters
        return (
            x, c1["weight"], c1["bias"], padding1, size1, c2["weight"], c2["bias"], padding2, size2,
            f1["weight"], f1["bias"], f2["weight"], f2["bias"], f3["weight"], f3["bias"],
        )  # fmt: skip
    except KeyError:  # a parameter replaced by a plain attribute, or parametrized
        return (
            x, conv1.weight, conv1.bias, padding1, size1, conv2.weight, conv2.bias, padding2, size2,
            fc1.weight, fc1.bias, fc2.weight, fc2.bias, fc3.weight, fc3.bias,
        )  # fmt: skip


_ABSENT = object()


def _layout_snapshot(layers: tuple, hook_dicts: tuple) -> Optional[tuple]:
    """_C.unchanged's arguments for what _LayoutCache.args decided from: the
    layers' types; the attributes of _config_key and the parameters, by
    identity, in the dicts they live in (instance dicts, _parameters); the
    hook dicts, empty; no forward in the layers' instance dicts. None when
    one of them lives elsewhere (a property, a parameter replaced by a plain
    attribute): then every call reads them."""
    entries = []
    for i, names in _CONFIG_ATTRIBUTES:
        entries += [(layers[i].__dict__, name) for name in names]
    entries += [(layers[i]._parameters, name) for i in _PARAMETER_LAYERS for name in ("weight", "bias")]
    entries += [(vars(_module_globals), name) for name in _GLOBAL_HOOK_DICTS]
    values = [where.get(key, _ABSENT) for where, key in entries]
    if any(value is _ABSENT for value in values):
        return None
    types = tuple(item for pair in zip(layers, _LENET_TYPES) for item in pair)
    triples = tuple(item for (where, key), value in zip(entries, values) for item in (where, key, value))
    empty = hook_dicts + tuple(getattr(_module_globals, name) for name in _GLOBAL_HOOK_DICTS)
    absent = tuple(item for layer in layers for item in (layer.__dict__, "forward"))  # _forward_replaced
    return types, triples, empty, absent


class _LayoutCache:
    """lenet_args for one set of 12 layer objects. LeNet.forward keeps one per
    model. What the arguments were decided from (the layers' types, their hook
    dictionaries, which register_*_hook and a handle's remove() change in
    place, their instance dicts' lack of a forward, the attributes of
    _config_key and the parameters) is checked at
    every call, in C (_C.unchanged) where they sit in plain dicts; anything
    replaced sends the call through the full reading again."""

    def __init__(self, layers: tuple):
        self.layers = layers
        self.hook_dicts = tuple(getattr(m, name) for m in layers for name in _HOOK_DICTS)
        # Pairs, each in one attribute, so that a thread never sees half of one:
        # (_config_key, what _operator_config decided from it), and
        # (_C.unchanged's arguments, the operator arguments after x).
        self.decided = (None, None)
        self.fast = None

    def args(self, x: Tensor, layers: tuple) -> Optional[tuple]:
        fast = self.fast
        if fast is not None and _unchanged(*fast[0]):
            return (x, *fast[1])
        # The snapshot before the reading: a change between the two makes the
        # next check fail, never pass.
        snapshot = _layout_snapshot(layers, self.hook_dicts)
        args = self.read(x, layers)
        self.fast = None if snapshot is None or args is None else (snapshot, args[1:])
        return args

    def read(self, x: Tensor, layers: tuple) -> Optional[tuple]:
        """The arguments from the layers as they are now, or None."""
        if (
            tuple(map(type, layers)) != _LENET_TYPES
            or any(self.hook_dicts)
            or _global_hooks()
            or any(map(_forward_replaced, layers))
        ):
            return None
        key = _config_key(layers)
        decided_key, config = self.decided
        if key != decided_key:
            conv1, _, pool1, conv2, _, pool2, flatten = layers[:7]
            config = _operator_config(conv1, pool1, conv2, pool2, flatten)
            self.decided = (key, config)
        return None if config is None else _args_from(x, layers, config)


def lenet_args(x: Tensor, layers) -> Optional[tuple]:
    """The LeNet operators' arguments, (x, *ops.LENET_PARAMS), from LeNet's 12
    layers as they are now, or None unless the layers are the reference's
    kinds, configured as the operators compute them, without hooks."""
    layers = tuple(layers)
    return _LayoutCache(layers).read(x, layers)


def _records_gradients(args: tuple) -> bool:
    return any(isinstance(a, Tensor) and a.requires_grad for a in args)


def _exporting_to_onnx(compiling: bool) -> bool:
    # The cheap tests first: torch.onnx.is_in_onnx_export imports two modules
    # at every call, and both exporters trace (TorchScript) or compile.
    return (compiling or _tracing_state() is not None) and torch.onnx.is_in_onnx_export()


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

    def forward(self, input: Tensor) -> Tensor:  # nn.Sequential's name: model(input=x) works alike
        # The whole network is one operator call, and with autograd one graph
        # node: at small batches the dispatches, not the arithmetic, are most
        # of the time, and at large ones a tile of images stays in cache
        # through all the layers.
        x = input
        compiling = torch.compiler.is_compiling()
        if (
            isinstance(x, Tensor)  # not an FX Proxy: symbolic tracing records the plain layers
            and x.dtype in _FUSED_DTYPES
            and (x.is_cpu or x.is_cuda)  # fuse._FUSED_DEVICES
            and not _functorch_transforms_active()
            and not _exporting_to_onnx(compiling)
        ):
            # ONNX has no lenet_ext operators: export runs the plain layers, and
            # so do torch.func's transforms and FX's symbolic tracing
            # (FusedSequential.forward).
            args = self._operator_args(x, compiling)
            if args is not None and x.dim() == 4:
                try:
                    # A TorchScript trace is one graph for every mode: the differentiable operator.
                    if (torch.is_grad_enabled() and _records_gradients(args)) or _tracing_state() is not None:
                        return ops.lenet_train_forward(*args)
                    return _LENET_FORWARD(*args)  # ops.lenet_forward without its frame
                except ValueError as e:
                    self._check_input(x, e)
                    raise
            if args is not None:
                self._check_input(x, None)
        return super().forward(x)

    def _operator_args(self, x: Tensor, compiling: bool) -> Optional[tuple]:
        """lenet_args for the layers as they are now, from a _LayoutCache of them."""
        layers = tuple(self._modules.values())
        if compiling:  # compiled code guards on what lenet_args reads
            return lenet_args(x, layers)
        cache = self.__dict__.get("_layout_cache")
        if cache is None or cache.layers != layers:
            if len(layers) != len(_LENET_TYPES):
                return None
            cache = self.__dict__["_layout_cache"] = _LayoutCache(layers)
        return cache.args(x, layers)

    def __prepare_scriptable__(self):
        # torch.jit.script compiles this instead: forward's Python does not script.
        layers = tuple(self._modules.values())
        args = _LayoutCache(layers).read(None, layers) if len(layers) == len(_LENET_TYPES) else None
        config = None if args is None else (args[3], args[4], args[7], args[8])  # conv1_padding, pool1, conv2_...
        return _as_scriptable(self, _ScriptableLeNet(layers, config))

    def __getstate__(self):
        # The layout cache holds the layers' dicts and torch's module globals,
        # which do not pickle; a copy or a loaded model builds its own.
        state = self.__dict__.copy()
        state.pop("_layout_cache", None)
        return state

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


class _ScriptableLeNet(nn.Sequential):
    """What torch.jit.script compiles for a LeNet (LeNet.__prepare_scriptable__):
    the same 12 layers, and one operator call when they were LeNet's, without
    hooks, at scripting time; otherwise the layers in turn, as the reference
    runs them. The layers are the LeNet's own, so their parameters are shared."""

    fused: bool
    padding1: int
    pool1: int
    padding2: int
    pool2: int

    def __init__(self, layers: tuple, config: Optional[tuple]):  # config: (conv1_padding, pool1, conv2_padding, pool2)
        super().__init__(*layers)
        self.fused = config is not None
        self.padding1, self.pool1, self.padding2, self.pool2 = config if config is not None else (0, 0, 0, 0)

    def forward(self, input: Tensor) -> Tensor:
        x = input
        fusable_input = x.dim() == 4 and (x.dtype == torch.float32 or x.dtype == torch.float64)
        if self.fused and fusable_input and (x.is_cuda or x.device.type == "cpu"):
            conv1, conv2, fc1, fc2, fc3 = self[0], self[3], self[7], self[9], self[11]
            records = torch.is_grad_enabled() and (
                x.requires_grad or conv1.weight.requires_grad or conv2.weight.requires_grad
                or fc1.weight.requires_grad or fc2.weight.requires_grad or fc3.weight.requires_grad
                or _any_requires_grad([conv1.bias, conv2.bias, fc1.bias, fc2.bias, fc3.bias])
            )  # fmt: skip
            if records:
                return torch.ops.lenet_ext.lenet_train_forward(
                    x, conv1.weight, conv1.bias, self.padding1, self.pool1, conv2.weight, conv2.bias,
                    self.padding2, self.pool2, fc1.weight, fc1.bias, fc2.weight, fc2.bias, fc3.weight, fc3.bias,
                )[0]  # fmt: skip
            return torch.ops.lenet_ext.lenet_forward(
                x, conv1.weight, conv1.bias, self.padding1, self.pool1, conv2.weight, conv2.bias,
                self.padding2, self.pool2, fc1.weight, fc1.bias, fc2.weight, fc2.bias, fc3.weight, fc3.bias,
            )  # fmt: skip
        for layer in self:
            x = layer(x)
        return x


def _any_requires_grad(tensors: list[Optional[Tensor]]) -> bool:
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False
