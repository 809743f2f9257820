"""A module's signature: what it computes from its input's shape, as a hashable key.

The planner measures a site's old and new modules on meta, where weights' values do not count; sites whose
modules have the same signature, on the same input shape, measure alike, so one measurement serves them all.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from rewrite.execution import is_small_constant

__all__ = ["module_signature"]


def module_signature(module: nn.Module) -> tuple | None:
    """What a module computes from its input's shape, as a key: its class and every attribute, recursively,
    tensors by their metadata (a site is measured on meta, where values do not count); None when an attribute
    holds something else than plain values, tensors, modules and containers of them.

    >>> from torch import nn
    >>> module_signature(nn.Conv2d(3, 8, 3)) == module_signature(nn.Conv2d(3, 8, 3))
    True
    >>> module_signature(nn.Conv2d(3, 8, 3)) == module_signature(nn.Conv2d(3, 8, 3, stride=2))
    False
    """
    try:
        return _signature_part(module, {})
    except _Unlike:
        return None


class _Unlike(Exception):
    """An attribute that a signature cannot hold."""


# Values that are their own key: immutable and compared by value (functions and classes: by identity).
_PLAIN = (
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    type(None),
    type,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
    types.FunctionType,
    types.BuiltinFunctionType,
)


_PLAIN_TYPES = frozenset(_PLAIN)


def _signature_part(value: Any, seen: dict[int, int], *, weights: bool = False) -> Any:
    """``value``'s part of a signature; a module or tensor met before (shared, or a cycle) by its first place,
    as sharing changes what counts (a shared weight counts once). ``weights``: tensors that runs on meta
    always replace by stand-ins (parameters and buffers), whose values no run reads."""
    kind = type(value)  # the commonest parts first: plain values, and a module's empty hook tables
    if kind in _PLAIN_TYPES:
        return (kind, value)
    if (kind is dict or kind is OrderedDict) and not value:
        return (kind, ())
    if isinstance(value, (nn.Module, torch.Tensor)):
        if id(value) in seen:
            return ("seen", seen[id(value)])
        seen[id(value)] = len(seen)
    if isinstance(value, nn.Module):
        return (
            type(value),
            tuple(
                (name, _signature_part(item, seen, weights=name in ("_parameters", "_buffers")))
                for name, item in vars(value).items()
            ),
        )
    if isinstance(value, torch.Tensor):
        # A small constant kept outside the weights may be read as a number on meta (rewrite.execution).
        read = not weights and not value.is_meta and is_small_constant(value)
        values = tuple(value.flatten().tolist()) if read else None
        return (type(value), tuple(value.shape), value.stride(), value.dtype, value.requires_grad, values)
    if isinstance(value, dict):
        return (
            type(value),
            tuple((key, _signature_part(item, seen, weights=weights)) for key, item in value.items()),
        )
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_signature_part(item, seen) for item in value))
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(_signature_part(item, seen) for item in value))
    if isinstance(value, _PLAIN):
        return (type(value), value)
    raise _Unlike
