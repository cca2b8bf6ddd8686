"""Running Conv2d -> Sigmoid -> AvgPool2d runs of an nn.Sequential through the fused operator."""

from collections import OrderedDict
from types import MethodType
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from .ops import _as_int, conv_sigmoid_avgpool2d

__all__ = ["FusedSequential", "fuse"]

_FUSED_DTYPES = (torch.float32, torch.float64)
_FUSED_DEVICES = ("cpu", "cuda")
# torch.func's transforms (grad, vmap, jacrev, ...) cannot run the operators'
# autograd kernels; under them the models run their plain layers.
_functorch_transforms_active = torch._C._are_functorch_transforms_active


# Sizes that mean 1 however they are written (modules store pairs; users may set ints).
_ONES = ((1, 1), 1, [1, 1])
_ZEROS = ((0, 0), 0, [0, 0])


def _square(value) -> Optional[int]:
    """The side of a square size given as an int (of any integer type) or a pair, else None."""
    if isinstance(value, (tuple, list)):
        return _as_int(value[0]) if len(value) == 2 and value[0] == value[1] else None
    return _as_int(value)


# A module's hook dicts, which _has_hooks reads.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _forward_replaced(module: nn.Module) -> bool:
    """A forward set on the instance (patched, or wrapped by a tool), which calls run instead of its class's.
    Read as an attribute, which torch.compile guards on (it does not guard a look into __dict__)."""
    forward = module.forward
    return not (isinstance(forward, MethodType) and forward.__func__ is type(module).forward)


def _customized(module: nn.Module) -> bool:
    """Whether a module must run as it is: it has hooks, or a forward of its own."""
    return _has_hooks(module) or _forward_replaced(module)


# The dicts of hooks registered for every module, which _global_hooks reads.
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")


def _global_hooks() -> bool:
    """Hooks registered for every module (torch.nn.modules.module.register_module_forward_hook, ...)."""
    return bool(
        _module_globals._global_forward_hooks
        or _module_globals._global_forward_pre_hooks
        or _module_globals._global_backward_hooks
        or _module_globals._global_backward_pre_hooks
    )


def _conv_padding(conv: nn.Conv2d) -> Optional[int]:
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        kernel = _square(conv.kernel_size)
        return (kernel - 1) // 2 if kernel is not None and kernel % 2 == 1 else None
    return _square(conv.padding)


def fusable_config(conv: nn.Conv2d, pool: nn.AvgPool2d) -> bool:
    """Whether a Conv2d and an AvgPool2d are configured as the fused operator computes them."""
    return (
        conv.stride in _ONES
        and conv.dilation in _ONES
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and _square(conv.kernel_size) is not None
        and _conv_padding(conv) is not None
        and _square(pool.kernel_size) is not None
        and (pool.stride == pool.kernel_size or _square(pool.stride) == _square(pool.kernel_size))
        and pool.padding in _ZEROS
        and not pool.ceil_mode
        and pool.divisor_override is None
    )


def _conv_block_kinds(conv: nn.Module, act: nn.Module, pool: nn.Module) -> bool:
    """Whether three modules are a Conv2d -> Sigmoid -> AvgPool2d run, subclasses included: a
    _ConvBlock, which fuses them whenever they are fusable."""
    return isinstance(conv, nn.Conv2d) and isinstance(act, nn.Sigmoid) and isinstance(pool, nn.AvgPool2d)


def fusable(conv: nn.Module, act: nn.Module, pool: nn.Module) -> bool:
    """Whether conv_sigmoid_avgpool2d computes exactly what these three modules do.

    The classes themselves, not subclasses, whose forward may compute
    anything (a lazy Conv2d becomes one at its first call). Read at every
    call, so that a layer changed after construction is run unfused rather
    than wrongly, and one that became fusable is fused.
    """
    return (
        type(conv) is nn.Conv2d
        and type(act) is nn.Sigmoid
        and type(pool) is nn.AvgPool2d
        and fusable_config(conv, pool)
        and not any(map(_customized, (conv, act, pool)))
    )


class _ConvBlock:
    """One fused Conv2d -> Sigmoid -> AvgPool2d run; falls back to the modules when it can't fuse."""

    def __init__(self, conv, act, pool):
        self.modules = (conv, act, pool)

    def __call__(self, x: Tensor) -> Tensor:
        conv, act, pool = self.modules
        if (
            x.dtype in _FUSED_DTYPES
            and x.device.type in _FUSED_DEVICES
            and x.dim() == 4
            and fusable(conv, act, pool)
            and not _global_hooks()
        ):
            return conv_sigmoid_avgpool2d(x, conv.weight, conv.bias, _conv_padding(conv), _square(pool.kernel_size))
        return pool(act(conv(x)))


class _LinearSigmoid:
    """Linear -> Sigmoid as two kernels (addmm, sigmoid), without the module calls."""

    def __init__(self, linear, act):
        self.modules = (linear, act)

    def __call__(self, x: Tensor) -> Tensor:
        linear, act = self.modules
        if any(map(_customized, (linear, act))) or _global_hooks():
            return act(linear(x))
        return torch.sigmoid(F.linear(x, linear.weight, linear.bias))


def _plan(children: Tuple[nn.Module, ...]):
    """Steps that compute the children in order; returns (steps, fused runs)."""
    steps, runs, i = [], [], 0
    while i < len(children):
        if i + 2 < len(children) and _conv_block_kinds(*children[i : i + 3]):
            steps.append(_ConvBlock(*children[i : i + 3]))
            if fusable(*children[i : i + 3]):
                runs.append((i, i + 3))
            i += 3
        elif (
            i + 1 < len(children)
            and type(children[i]) is nn.Linear
            and type(children[i + 1]) is nn.Sigmoid
        ):
            steps.append(_LinearSigmoid(children[i], children[i + 1]))
            i += 2
        else:
            steps.append(children[i])
            i += 1
    return steps, runs


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose Conv2d -> Sigmoid -> AvgPool2d runs run fused.

    Its children, parameters and state_dict are those of a plain nn.Sequential
    built from the same modules; only forward differs. The plan is rebuilt
    whenever a child is replaced, added or removed.
    """

    def _current_plan(self):
        children = tuple(self._modules.values())
        if getattr(self, "_plan_children", None) != children:
            self._plan_steps = _plan(children)[0]
            self._plan_children = children
        return self._plan_steps

    def fused_runs(self) -> List[Tuple[int, int]]:
        """[start, stop) child indices of each run that forward computes fused, as the layers are now."""
        return _plan(tuple(self._modules.values()))[1]

    def forward(self, input: Tensor) -> Tensor:  # nn.Sequential's name: model(input=x) works alike
        # ONNX has no lenet_ext operators: export the plain layers; see also
        # _functorch_transforms_active. FX's symbolic tracing (a Proxy input)
        # records the plain layers, a node per layer, as tools built on it expect.
        x = input
        if not isinstance(x, Tensor) or _functorch_transforms_active() or torch.onnx.is_in_onnx_export():
            return super().forward(x)
        for step in self._current_plan():
            x = step(x)
        return x

    def __prepare_scriptable__(self):
        # torch.jit.script (deprecated by PyTorch) compiles the plain layers:
        # the plan is Python. LeNet's own has its one operator call.
        return _as_scriptable(self, nn.Sequential(OrderedDict(self._modules)))

    def extra_repr(self) -> str:
        return f"fused_runs={self.fused_runs()}"


# A module's own hook dicts: the scriptable module torch.jit.script compiles
# in its place keeps them.
_MODULE_HOOK_DICTS = _HOOK_DICTS + (
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
)  # fmt: skip


def _as_scriptable(module: nn.Module, scriptable: nn.Module) -> nn.Module:
    """scriptable, which holds module's children, with module's own hooks and mode."""
    for name in _MODULE_HOOK_DICTS:
        getattr(scriptable, name).update(getattr(module, name))
    scriptable.training = module.training  # not train(): the children are module's
    return scriptable


def fuse(model: nn.Module) -> nn.Module:
    """A module computing what `model` computes, with its fusable runs fused.

    `model` is an nn.Sequential (nested ones are fused too). The result holds
    the very same child modules, so it shares every parameter and buffer with
    `model`: training either one trains both. Other modules are returned as
    they are.
    """
    if not isinstance(model, nn.Sequential):
        return model
    fused = FusedSequential()
    for name, child in model.named_children():
        fused.add_module(name, fuse(child) if type(child) is nn.Sequential else child)
    fused.train(model.training)
    return fused
