"""Ops on meta tensors, worked out once per signature and made again: what a meta run of a model costs.

On the meta device an op costs only its output's metadata, but working that out runs Python for many ops, and
a model repeats the same few calls many times. :class:`MetaOpMemo` (and the profiler's counting mode, through
:func:`meta_op_signature`, :func:`meta_output` and :func:`remember_meta_output`) works each out once per
signature for the whole process. The outputs of a few common ops follow from rules (:mod:`rewrite.meta_rules`),
so that their meta kernels, Python that imports ``torch._dynamo`` on first use, need not run at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from rewrite.meta_rules import RULED, Layout, output_by_rule

__all__ = [
    "MetaOpMemo",
    "UncompiledDispatchMode",
    "meta_op_signature",
    "meta_output",
    "remember_meta_output",
]

aten = torch.ops.aten


class UncompiledDispatchMode(TorchDispatchMode):
    """A dispatch mode under which nothing is compiled: torch leaves its ``__torch_dispatch__`` as written.

    torch wraps a mode's ``__torch_dispatch__`` so that ``torch.compile`` skips it; the wrapper imports
    ``torch._dynamo`` (seconds) at the first op and costs a call per op after that.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


class MetaOpMemo(UncompiledDispatchMode):
    """A dispatch mode that runs each op on meta tensors once per signature, then makes its output again.

    On meta an op costs only its output's metadata, but working that out runs Python for many ops (a
    BatchNorm's decomposition costs milliseconds), and a model repeats the same few calls many times. The
    output of an op on meta tensors depends only on the op and its arguments' metadata (shapes, strides,
    dtypes) and plain values, so it is worked out once per such signature (:func:`meta_op_signature`) for the
    whole process and made again (fresh meta tensors of the same layout) for the next call with that
    signature. Ops whose outputs alias an input (views, in-place ops) and calls with a tensor off meta run as
    they are; an op that fails is never memoized.

    >>> conv = nn.Conv2d(3, 8, 3, device="meta")
    >>> with MetaOpMemo():
    ...     first = conv(torch.empty(1, 3, 8, 8, device="meta"))
    ...     again = conv(torch.empty(1, 3, 8, 8, device="meta"))
    >>> again.shape, again is first, again.device
    (torch.Size([1, 8, 6, 6]), False, device(type='meta'))
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        signature = meta_op_signature(func, args, kwargs)
        if signature is None:
            return func(*args, **kwargs)
        made = meta_output(signature, args, kwargs)
        if made is not None:
            return made.make()
        out = func(*args, **kwargs)
        remember_meta_output(signature, out, args, kwargs)
        return out


class _MetaOutput:
    """The metadata of what an op gave on meta, to make an equal output again."""

    def __init__(self, out: Any) -> None:
        leaves, self.spec = pytree.tree_flatten(out)
        self.leaves = [Layout.of(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        # Most ops give one tensor: made without the tree.
        self.tensor = self.leaves[0] if self.spec.is_leaf() and isinstance(self.leaves[0], Layout) else None

    def make(self) -> Any:
        if self.tensor is not None:
            return self.tensor.make()
        leaves = [leaf.make() if isinstance(leaf, Layout) else leaf for leaf in self.leaves]
        return pytree.tree_unflatten(leaves, self.spec)


# Every op's meta output per signature, for the whole process: a signature's output never changes. Bounded, so
# that a long-lived process planning many different models does not grow without end.
_META_OUTPUTS: dict[tuple, _MetaOutput] = {}
_META_OUTPUTS_LIMIT = 200_000
_MEMOIZABLE_OPS: dict[Any, bool] = {}


def meta_op_signature(func: Any, args: tuple, kwargs: dict) -> tuple | None:
    """What determines ``func(*args, **kwargs)``'s output on meta tensors: the op, and every argument's
    metadata (tensors) or value (the rest); None when the call is not memoizable (see :class:`MetaOpMemo`).

    >>> x = torch.empty(2, 3, device="meta")
    >>> meta_op_signature(torch.ops.aten.add.Tensor, (x, x), {}) == meta_op_signature(
    ...     torch.ops.aten.add.Tensor, (torch.empty(2, 3, device="meta"), x), {}
    ... )
    True
    >>> meta_op_signature(torch.ops.aten.add_.Tensor, (x, x), {}) is None  # in place: returns its input
    True
    """
    memoizable = _MEMOIZABLE_OPS.get(func)
    if memoizable is None:
        schema = getattr(func, "_schema", None)
        memoizable = _MEMOIZABLE_OPS[func] = (
            schema is not None
            and all(value.alias_info is None for value in schema.returns)
            and torch.Tag.inplace_view not in getattr(func, "tags", ())
        )
    if not memoizable:
        return None
    try:
        # The default dtype too: a factory op without a dtype makes tensors of it.
        return (func, _signature_of(args), _signature_of(kwargs), torch.get_default_dtype())
    except _NotMemoizable:
        return None


def meta_output(signature: tuple, args: tuple, kwargs: dict) -> _MetaOutput | None:
    """What the op of ``signature`` (called with ``args`` and ``kwargs``) gives on meta, when it was remembered
    or follows from a rule (:mod:`rewrite.meta_rules`): ``.make()`` makes it; None when the op must run.

    >>> x = torch.empty(2, 8, 4, 4, device="meta")
    >>> bn = (x, None, None, torch.empty(8, device="meta"), torch.empty(8, device="meta"), False, 0.1, 1e-5)
    >>> signature = meta_op_signature(aten.native_batch_norm.default, bn, {})
    >>> [t.shape for t in meta_output(signature, bn, {}).make()]
    [torch.Size([2, 8, 4, 4]), torch.Size([8]), torch.Size([8])]
    """
    made = _META_OUTPUTS.get(signature)
    if made is None and signature[0] in RULED:
        layouts = output_by_rule(signature[0], args, kwargs)
        if layouts is not None:
            made = _MetaOutput(layouts)
            _remember(signature, made)
    return made


def remember_meta_output(signature: tuple, out: Any, args: tuple, kwargs: dict) -> bool:
    """Keep ``out``, what the op of ``signature`` gave, unless it shares memory with its arguments or holds
    something other than fresh meta tensors and plain values; whether it was kept."""
    inputs = {id(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            fresh = type(leaf) is torch.Tensor and leaf.is_meta and leaf._base is None
            if not fresh or leaf.storage_offset() or id(leaf) in inputs:
                return False
        elif not isinstance(leaf, _PLAIN_VALUES):
            return False
    _remember(signature, _MetaOutput(out))
    return True


def _remember(signature: tuple, made: _MetaOutput) -> None:
    if len(_META_OUTPUTS) >= _META_OUTPUTS_LIMIT:
        _META_OUTPUTS.clear()
    _META_OUTPUTS[signature] = made


class _NotMemoizable(Exception):
    pass


_PLAIN_VALUES = (
    bool,
    int,
    float,
    complex,
    str,
    type(None),
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)


_PLAIN_TYPES = frozenset(_PLAIN_VALUES)


def _signature_of(value: Any) -> Any:
    kind = type(value)  # exact types first: an op's arguments are nearly all plain tensors, numbers and lists
    if kind in _PLAIN_TYPES:
        return (kind, value)  # the type too: 1, 1.0 and True are equal keys
    if kind is torch.Tensor or kind is nn.Parameter:
        if not value.is_meta or value.layout != torch.strided:
            raise _NotMemoizable
        return (
            torch.Tensor,
            tuple(value.shape),
            value.stride(),
            value.storage_offset(),
            value.dtype,
            value.is_conj(),
            value.is_neg(),
        )
    if isinstance(value, torch.Tensor):
        raise _NotMemoizable
    if isinstance(value, (tuple, list)):
        return (kind, tuple([_signature_of(item) for item in value]))
    if isinstance(value, dict):
        return (dict, tuple([(key, _signature_of(item)) for key, item in value.items()]))
    if isinstance(value, _PLAIN_VALUES):
        return (kind, value)
    raise _NotMemoizable
