"""The one table of ops: what each module class, function and tensor method is to the library.

Every row of :data:`OPS` is one op in all its spellings (``nn.SiLU``, ``F.silu``; ``nn.ReLU``, ``F.relu``,
``Tensor.relu``) with its :class:`Role`\\ s: a conv, a norm or an activation (the categories rules name, and for an
activation the module that reproduces it), channel-wise, element-wise, data movement, value-preserving, and the
few roles one stage asks about. A module belongs to a row by its class hierarchy (subclasses too), a function by
identity, a tensor method by name. Everything that asks what an op is (tracer, graph, matcher, rewriter, fold,
builders) asks here:

>>> import torch.nn.functional as F
>>> has_role(Role.CHANNELWISE, "call_module", "act", nn.SELU()), has_role(Role.ACTIVATION, "call_method", "relu")
(True, True)
>>> sorted(roles("call_function", F.leaky_relu))
[<Role.ACTIVATION: 'activation'>, <Role.CHANNELWISE: 'channelwise'>]

The categories rules name (conv, norm, activation) are :data:`CATEGORIES`; the tracer keeps every module in one
of them as one ``call_module`` node (a leaf), so the matcher sees ``FrozenBatchNorm2d`` or timm's ``Conv2dSame`` as
one step of a chain instead of the arithmetic inside them. An activation node is reproduced by a module with the
node's own arguments:

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
import enum
import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATION_NAMES",
    "CATEGORIES",
    "OPS",
    "Category",
    "ClassName",
    "IrreproducibleError",
    "Op",
    "Role",
    "carried_activation",
    "category_of",
    "has_role",
    "is_idempotent",
    "is_vocabulary_module",
    "node_in_category",
    "reproduce_activation",
    "roles",
]


class Role(enum.StrEnum):
    """What an op is to the library; an op may have several roles."""

    # The categories rules name. The matcher reads a conv's channels, kernel, stride and groups; new blocks take
    # a norm's eps and momentum, and compute an activation again (Op.module with Op.arguments).
    CONV = "conv"
    NORM = "norm"
    ACTIVATION = "activation"
    # An affine map by running statistics in eval mode: fold puts it into the conv before it.
    BATCH_NORM = "batch_norm"
    # Treats every channel alike, out of place: a permutation of the channels passes through it.
    CHANNELWISE = "channelwise"
    # Combines tensors entry by entry, broadcasting.
    ELEMENTWISE = "elementwise"
    # Joins tensors along a dim.
    CONCATENATION = "concatenation"
    # Only moves or selects data: a chain of them may be a permutation of the channels.
    MOVEMENT = "movement"
    # Every value out is one of its first tensor argument's (torch.cat: of its tensors').
    VALUE_PRESERVING = "value_preserving"
    # Reads or computes a size (x.size(), b * c) when its result is not a tensor.
    SIZE = "size"
    # May make a feature map larger: where a detector's neck starts.
    UPSAMPLING = "upsampling"
    # f(f(x)) = f(x): a new block ending in it may be followed by it again.
    IDEMPOTENT = "idempotent"
    # Returns its input in eval mode: fold drops it.
    NO_OP = "no_op"


class ClassName(str):
    """A module class of a package this library does not import (torchvision's ``FrozenBatchNorm2d``), matched by
    name anywhere along a module's class hierarchy."""


# A spelling of an op: a module class, a function, a tensor method's name, or a class known by name.
Spelling = type[nn.Module] | Callable[..., Any] | str


@dataclass(frozen=True)
class Op:
    """One op in its spellings and what it is to the library.

    ``module`` and ``arguments`` say how an activation's function or method is reproduced as a module: the module
    class and the names of the arguments after the input that it takes (``inplace`` never: a new block computes
    out of place). ``name`` is what a builder's ``activation`` option calls it.
    """

    spellings: tuple[Spelling, ...]
    roles: frozenset[Role]
    module: type[nn.Module] | None = None
    arguments: tuple[str, ...] = ()
    name: str | None = None


def _op(*spellings: Spelling, roles: str, module: type[nn.Module] | None = None, **how: Any) -> Op:
    """A row of the table: its roles written as their names, separated by spaces; its module, unless given, the
    first module class among its spellings."""
    classes = (s for s in spellings if isinstance(s, type) and issubclass(s, nn.Module))
    return Op(
        spellings, frozenset(Role(name) for name in roles.split()), module or next(classes, None), **how
    )


OPS: tuple[Op, ...] = (
    # Convolutions and norms: _NormBase is BatchNorm*, SyncBatchNorm and InstanceNorm*; LayerNorm covers timm's
    # LayerNorm2d. Transposed convs are no conv step: their facts are not a conv's.
    _op(nn.Conv1d, nn.Conv2d, nn.Conv3d, F.conv1d, F.conv2d, F.conv3d, roles="conv"),
    _op(nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, ClassName("FrozenBatchNorm2d"), roles="norm"),
    _op(F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm, roles="norm"),
    _op(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, roles="norm batch_norm"),
    # Activations, the named ones first in the order a builder's activation option lists them. In-place
    # functions and methods are no channel-wise op: fold would run them on a tensor other readers share.
    _op(nn.SiLU, F.silu, roles="activation channelwise", name="silu"),
    _op(nn.ReLU, torch.relu, F.relu, "relu", roles="activation channelwise idempotent", name="relu"),
    _op(torch.relu_, "relu_", roles="activation idempotent", module=nn.ReLU),  # F.relu_ is torch.relu_
    _op(nn.Hardswish, F.hardswish, roles="activation channelwise", name="hardswish"),
    _op(
        nn.LeakyReLU, F.leaky_relu, roles="activation channelwise", arguments=("negative_slope",), name="leaky_relu"
    ),
    _op(F.leaky_relu_, roles="activation", arguments=("negative_slope",), module=nn.LeakyReLU),
    _op(nn.GELU, F.gelu, roles="activation channelwise", arguments=("approximate",), name="gelu"),
    _op(nn.Identity, roles="activation idempotent no_op", name="identity"),
    _op(nn.ReLU6, F.relu6, roles="activation channelwise"),  # a Hardtanh, so idempotent
    _op(nn.Hardtanh, F.hardtanh, roles="activation channelwise idempotent", arguments=("min_val", "max_val")),
    _op(F.hardtanh_, roles="activation idempotent", arguments=("min_val", "max_val"), module=nn.Hardtanh),
    _op(nn.Hardsigmoid, F.hardsigmoid, roles="activation channelwise"),
    _op(nn.ELU, F.elu, roles="activation channelwise", arguments=("alpha",)),
    _op(F.elu_, roles="activation", arguments=("alpha",), module=nn.ELU),
    _op(nn.CELU, F.celu, roles="activation channelwise", arguments=("alpha",)),
    _op(F.celu_, roles="activation", arguments=("alpha",), module=nn.CELU),
    _op(nn.SELU, F.selu, roles="activation channelwise"),
    _op(F.selu_, roles="activation", module=nn.SELU),
    _op(nn.Mish, F.mish, roles="activation channelwise"),
    _op(nn.Softplus, F.softplus, roles="activation channelwise", arguments=("beta", "threshold")),
    _op(nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid", roles="activation channelwise"),
    _op("sigmoid_", roles="activation", module=nn.Sigmoid),
    _op(nn.Tanh, torch.tanh, F.tanh, "tanh", roles="activation channelwise"),
    _op("tanh_", roles="activation", module=nn.Tanh),
    _op(nn.PReLU, roles="activation"),  # one slope per channel: not channel-wise
    # Other channel-wise ops.
    _op(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, roles="channelwise"),
    _op(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, roles="channelwise"),
    _op(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, roles="channelwise"),
    _op(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, roles="channelwise"),
    _op(
        nn.Upsample, F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear,
        roles="channelwise upsampling",
    ),
    _op(operator.neg, torch.neg, "neg", roles="channelwise"),
    _op("clone", roles="channelwise"),
    _op("contiguous", roles="channelwise movement value_preserving"),
    # Upsampling that moves channels or weighs them.
    _op(nn.PixelShuffle, F.pixel_shuffle, roles="upsampling"),
    _op(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, roles="upsampling"),
    _op(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, roles="upsampling"),
    # Element-wise arithmetic; on plain numbers the operators compute sizes.
    _op(operator.add, operator.sub, operator.mul, roles="elementwise size"),
    _op(operator.truediv, torch.add, torch.sub, torch.mul, torch.div, roles="elementwise"),
    _op("add", "sub", "mul", "div", roles="elementwise"),
    _op(operator.floordiv, getattr, "size", "dim", roles="size"),
    # Data movement.
    _op(operator.getitem, roles="movement value_preserving size"),
    _op(torch.cat, roles="movement value_preserving concatenation"),
    # The rewriter follows the values of every tensor only for torch.cat.
    _op(torch.concat, roles="movement concatenation"),
    _op(torch.stack, roles="movement"),
    _op(
        torch.index_select, torch.transpose, torch.permute, torch.flatten, torch.unflatten,
        roles="movement value_preserving",
    ),
    _op(torch.reshape, torch.narrow, torch.chunk, torch.split, roles="movement value_preserving"),
    _op(
        "view", "reshape", "flatten", "unflatten", "transpose", "permute", "index_select",
        roles="movement value_preserving",
    ),
    _op("narrow", "chunk", "split", roles="movement value_preserving"),
    # Identities in eval mode.
    _op(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, roles="no_op"),
)  # fmt: skip


def _index() -> tuple[dict[type, frozenset[Role]], dict[str, frozenset[Role]], dict[Any, Op], dict[str, Op]]:
    """Module classes, class names, functions and methods to their rows (functions and methods once each)."""
    classes: dict[type, frozenset[Role]] = {}
    names: dict[str, frozenset[Role]] = {}
    functions: dict[Any, Op] = {}
    methods: dict[str, Op] = {}
    for op in OPS:
        for spelling in op.spellings:
            if isinstance(spelling, ClassName):
                names[spelling] = names.get(spelling, frozenset()) | op.roles
            elif isinstance(spelling, str):
                methods[spelling] = op
            elif isinstance(spelling, type):
                classes[spelling] = classes.get(spelling, frozenset()) | op.roles
            else:
                functions[spelling] = op
    return classes, names, functions, methods


_CLASSES, _CLASS_NAMES, _FUNCTIONS, _METHODS = _index()
_NONE: frozenset[Role] = frozenset()


@functools.cache
def _module_roles(cls: type) -> frozenset[Role]:
    return frozenset().union(
        *(_CLASSES.get(c, _NONE) | _CLASS_NAMES.get(c.__name__, _NONE) for c in cls.__mro__)
    )


def _row(op: str, target: object) -> Op | None:
    if op == "call_method" and isinstance(target, str):
        return _METHODS.get(target)
    if op == "call_function" and _hashable(target):
        return _FUNCTIONS.get(target)
    return None


def roles(op: str, target: object, module: nn.Module | None = None) -> frozenset[Role]:
    """The roles of an fx node: its ``op``, its ``target``, and for ``call_module`` the module it calls."""
    if op == "call_module":
        return _module_roles(type(module)) if module is not None else _NONE
    row = _row(op, target)
    return row.roles if row is not None else _NONE


def has_role(role: Role, op: str, target: object, module: nn.Module | None = None) -> bool:
    """Whether an fx node (its ``op``, ``target``, and the module a ``call_module`` calls) has ``role``."""
    return role in roles(op, target, module)


@dataclass(frozen=True)
class Category:
    """One op category rules name: the modules (by class hierarchy), functions and tensor methods in it."""

    role: Role

    @property
    def name(self) -> str:
        return self.role.value

    def has_module(self, module: nn.Module) -> bool:
        return self.role in _module_roles(type(module))

    def has_function(self, target: object) -> bool:
        return has_role(self.role, "call_function", target)

    def has_method(self, name: object) -> bool:
        return has_role(self.role, "call_method", name)


CATEGORIES: Mapping[str, Category] = MappingProxyType(
    {role.value: Category(role) for role in (Role.CONV, Role.NORM, Role.ACTIVATION)}
)

# What a builder's ``activation`` option accepts besides "inherit" (the site's own activation); LeakyReLU with
# PyTorch's slope, 0.01.
ACTIVATION_NAMES: Mapping[str, Callable[[], nn.Module]] = MappingProxyType(
    {op.name: op.module for op in OPS if op.name is not None and op.module is not None}
)


class IrreproducibleError(ValueError):
    """An activation node whose arguments are computed by the forward, so no module with fixed arguments
    reproduces it."""


def category_of(module: nn.Module) -> str | None:
    """The category ``module`` belongs to, or ``None``."""
    return next((name for name, category in CATEGORIES.items() if category.has_module(module)), None)


def is_vocabulary_module(module: nn.Module) -> bool:
    """Whether ``module`` belongs to a category, so the tracer keeps each call of it as one node."""
    return category_of(module) is not None


def node_in_category(category: str, op: str, target: object, module: nn.Module | None) -> bool:
    """Whether an fx node (its ``op``, its ``target``, the module a ``call_module`` calls) is in ``category``."""
    return has_role(CATEGORIES[category].role, op, target, module)


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
    row = _row(op, target)
    if row is None or Role.ACTIVATION not in row.roles or row.module is None:
        raise ValueError(f"{_describe(target)} is not an activation")
    values = dict(zip(row.arguments, args[1:]))
    values.update((name, kwargs[name]) for name in row.arguments if name in kwargs)
    computed = [name for name, value in values.items() if isinstance(value, torch.fx.Node)]
    if computed:
        raise IrreproducibleError(
            f"{_describe(target)} takes {', '.join(computed)} computed by the forward; no module with fixed "
            "arguments reproduces it"
        )
    return row.module(**values)


def is_idempotent(activation: nn.Module) -> bool:
    """Whether applying ``activation`` twice is applying it once (ReLU, ReLU6, Hardtanh, Identity)."""
    return Role.IDEMPOTENT in _module_roles(type(activation))


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
