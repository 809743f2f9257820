"""The op categories rules name — ``conv``, ``norm``, ``activation`` — in one table.

Each :class:`Category` answers the two questions the pipeline asks about an fx node: does the node belong to the
category (a module by its class hierarchy, a function by identity, a tensor method by name), and, for
activations, which module reproduces it, with the node's own arguments. The tracer keeps every module the table
names as one ``call_module`` node (a leaf), so the matcher sees ``FrozenBatchNorm2d`` or timm's ``Conv2dSame`` as
one step of a chain instead of the arithmetic inside them.

>>> import torch.nn.functional as F
>>> activation = CATEGORIES["activation"]
>>> activation.has_module(nn.SiLU()), activation.has_function(F.leaky_relu), activation.has_method("relu")
(True, True, True)
>>> reproduce_activation("call_function", F.leaky_relu, (None, 0.2), {})
LeakyReLU(negative_slope=0.2)
>>> reproduce_activation("call_method", "relu", (None,), {})
ReLU()

A norm that also applies an activation (timm's ``BatchNormAct2d``: a ``BatchNorm2d`` holding an ``act``) is a
norm step, and carries the activation of the site it ends:

>>> class BatchNormAct(nn.BatchNorm2d):
...     def __init__(self, channels):
...         super().__init__(channels)
...         self.act = nn.ReLU()
>>> category_of(BatchNormAct(8)), carried_activation(BatchNormAct(8))
('norm', ReLU())
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATION_NAMES",
    "CATEGORIES",
    "Category",
    "IrreproducibleError",
    "carried_activation",
    "category_of",
    "is_idempotent",
    "is_vocabulary_module",
    "node_in_category",
    "reproduce_activation",
]

# How a function or tensor method is reproduced as a module: the module class and the names of the arguments
# after the input that the module takes (``inplace`` never: a new block computes out of place).
Reproduction = tuple[type[nn.Module], tuple[str, ...]]


class IrreproducibleError(ValueError):
    """An activation node whose arguments are computed by the forward, so no module with fixed arguments
    reproduces it."""


@dataclass(frozen=True)
class Category:
    """One op category: the modules, functions and tensor methods that belong to it.

    ``module_types`` are matched with ``isinstance`` (so subclasses belong too); ``class_names`` name classes of
    packages this library does not import (torchvision's ``FrozenBatchNorm2d``), matched anywhere along the
    module's class hierarchy. ``functions`` and ``methods`` map fx node targets to their reproduction, or to
    ``None`` where the category needs no module for them (a functional conv has no facts a builder uses).
    """

    name: str
    module_types: tuple[type[nn.Module], ...]
    class_names: frozenset[str] = frozenset()
    functions: Mapping[Callable[..., Any], Reproduction | None] = field(default_factory=dict)
    methods: Mapping[str, Reproduction | None] = field(default_factory=dict)

    def has_module(self, module: nn.Module) -> bool:
        return isinstance(module, self.module_types) or any(
            cls.__name__ in self.class_names for cls in type(module).__mro__
        )

    def has_function(self, target: object) -> bool:
        return _hashable(target) and target in self.functions

    def has_method(self, name: object) -> bool:
        return isinstance(name, str) and name in self.methods


def _activations(*pairs: tuple[tuple[object, ...], Reproduction]) -> dict[Any, Reproduction]:
    return {target: reproduction for targets, reproduction in pairs for target in targets}


_ACTIVATION_FUNCTIONS = _activations(
    ((torch.relu, torch.relu_, F.relu, F.relu_), (nn.ReLU, ())),
    ((F.relu6,), (nn.ReLU6, ())),
    ((F.silu,), (nn.SiLU, ())),
    ((F.gelu,), (nn.GELU, ("approximate",))),
    ((F.hardswish,), (nn.Hardswish, ())),
    ((F.hardsigmoid,), (nn.Hardsigmoid, ())),
    ((F.hardtanh, F.hardtanh_), (nn.Hardtanh, ("min_val", "max_val"))),
    ((F.leaky_relu, F.leaky_relu_), (nn.LeakyReLU, ("negative_slope",))),
    ((F.elu, F.elu_), (nn.ELU, ("alpha",))),
    ((F.celu, F.celu_), (nn.CELU, ("alpha",))),
    ((F.selu, F.selu_), (nn.SELU, ())),
    ((F.mish,), (nn.Mish, ())),
    ((F.softplus,), (nn.Softplus, ("beta", "threshold"))),
    ((torch.sigmoid, F.sigmoid), (nn.Sigmoid, ())),
    ((torch.tanh, F.tanh), (nn.Tanh, ())),
)
_ACTIVATION_METHODS = _activations(
    (("relu", "relu_"), (nn.ReLU, ())),
    (("sigmoid", "sigmoid_"), (nn.Sigmoid, ())),
    (("tanh", "tanh_"), (nn.Tanh, ())),
)

CATEGORIES: Mapping[str, Category] = MappingProxyType(
    {
        "conv": Category(
            "conv",
            (nn.Conv1d, nn.Conv2d, nn.Conv3d),
            functions=dict.fromkeys((F.conv1d, F.conv2d, F.conv3d)),
        ),
        "norm": Category(
            "norm",
            # _NormBase: BatchNorm*, SyncBatchNorm and InstanceNorm*; LayerNorm covers timm's LayerNorm2d.
            (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm),
            class_names=frozenset({"FrozenBatchNorm2d"}),
            functions=dict.fromkeys((F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm)),
        ),
        "activation": Category(
            "activation",
            (
                nn.ReLU,
                nn.ReLU6,
                nn.Hardtanh,
                nn.SiLU,
                nn.GELU,
                nn.Hardswish,
                nn.Hardsigmoid,
                nn.LeakyReLU,
                nn.ELU,
                nn.CELU,
                nn.SELU,
                nn.Mish,
                nn.Softplus,
                nn.Sigmoid,
                nn.Tanh,
                nn.PReLU,
                nn.Identity,
            ),
            functions=_ACTIVATION_FUNCTIONS,
            methods=_ACTIVATION_METHODS,
        ),
    }
)

# What a builder's ``activation`` option accepts besides "inherit" (the site's own activation).
ACTIVATION_NAMES: Mapping[str, Callable[[], nn.Module]] = MappingProxyType(
    {
        "silu": nn.SiLU,
        "relu": nn.ReLU,
        "hardswish": nn.Hardswish,
        "leaky_relu": nn.LeakyReLU,  # PyTorch's slope, 0.01
        "gelu": nn.GELU,
        "identity": nn.Identity,
    }
)

# Activations for which f(f(x)) = f(x): a new block ending in one may be followed by it again.
_IDEMPOTENT = (nn.ReLU, nn.Hardtanh, nn.Identity)  # nn.ReLU6 is a Hardtanh


def category_of(module: nn.Module) -> str | None:
    """The category ``module`` belongs to, or ``None``."""
    return next((name for name, category in CATEGORIES.items() if category.has_module(module)), None)


def is_vocabulary_module(module: nn.Module) -> bool:
    """Whether ``module`` belongs to a category, so the tracer keeps each call of it as one node."""
    return category_of(module) is not None


def node_in_category(category: str, op: str, target: object, module: nn.Module | None) -> bool:
    """Whether an fx node (its ``op``, its ``target``, the module a ``call_module`` calls) is in ``category``."""
    entry = CATEGORIES[category]
    if op == "call_module":
        return module is not None and entry.has_module(module)
    if op == "call_function":
        return entry.has_function(target)
    if op == "call_method":
        return entry.has_method(target)
    return False


def carried_activation(norm: nn.Module) -> nn.Module | None:
    """The activation a norm module applies itself, or ``None``: its last child in the activation category
    other than ``nn.Identity`` (timm's ``BatchNormAct2d`` holds an ``Identity`` for its dropout before ``act``)."""
    held = [child for child in norm.children() if CATEGORIES["activation"].has_module(child)]
    return next((child for child in reversed(held) if not isinstance(child, nn.Identity)), None)


def reproduce_activation(
    op: str, target: object, args: tuple[Any, ...], kwargs: Mapping[str, Any], module: nn.Module | None = None
) -> nn.Module:
    """A new module computing what an activation node computes, with the node's own arguments.

    A module node gives a copy of its module. Raises :class:`IrreproducibleError` when an argument is computed
    by the forward (an fx node) rather than written in it, and ``ValueError`` for a node outside the category.
    """
    if op == "call_module" and module is not None and CATEGORIES["activation"].has_module(module):
        return copy.deepcopy(module)
    entry = CATEGORIES["activation"]
    if op == "call_function" and entry.has_function(target):
        reproduction = entry.functions[target]
    elif op == "call_method" and entry.has_method(target):
        reproduction = entry.methods[target]
    else:
        raise ValueError(f"{_describe(target)} is not an activation")
    cls, names = reproduction
    values = dict(zip(names, args[1:]))
    values.update((name, kwargs[name]) for name in names if name in kwargs)
    computed = [name for name, value in values.items() if isinstance(value, torch.fx.Node)]
    if computed:
        raise IrreproducibleError(
            f"{_describe(target)} takes {', '.join(computed)} computed by the forward; no module with fixed "
            "arguments reproduces it"
        )
    return cls(**values)


def is_idempotent(activation: nn.Module) -> bool:
    """Whether applying ``activation`` twice is applying it once (ReLU, ReLU6, Hardtanh, Identity)."""
    return isinstance(activation, _IDEMPOTENT)


def _describe(target: object) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', target)}".lstrip(".")


def _hashable(target: object) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True
