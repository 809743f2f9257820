"""The outputs of common ops on meta tensors, worked out by rule instead of by their meta kernels.

torch's meta kernels for BatchNorm, elementwise arithmetic, ``cat``, ``stack`` and ``arange`` are Python
references wrapped so that ``torch.compile`` skips them, and that wrapper imports ``torch._dynamo`` (seconds) on
its first call: every meta run of a detector would pay for it. Each rule gives the layout those kernels give
(shape, strides, dtype), computed with the same helpers of ``torch._prims_common`` where strides need them, for
the plain cases: floating dtypes, no optional arguments. Anything else gives None, and the kernel runs, with
its own errors. ``tests/test_meta_rules.py`` checks every rule against the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._prims_common import (
    compute_elementwise_output_logical_to_physical_perm,
    make_channels_last_strides_for,
    make_contiguous_strides_for,
    suggest_memory_format,
)

__all__ = ["RULED", "Layout", "output_by_rule"]

aten = torch.ops.aten

_HALF_PRECISION = (torch.float16, torch.bfloat16)
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FULL_PRECISION = (torch.float32, torch.float64)  # elementwise kernels compute half precision in float32


class Layout:
    """The metadata of one meta tensor: what makes an equal one again."""

    __slots__ = ("dtype", "shape", "stride")

    def __init__(self, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape, self.stride, self.dtype = shape, stride, dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Layout:
        return cls(tuple(tensor.shape), tensor.stride(), tensor.dtype)

    def make(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


def output_by_rule(func: Any, args: tuple, kwargs: dict) -> Layout | tuple[Layout, ...] | None:
    """What ``func(*args, **kwargs)`` gives on meta tensors, by the rule for ``func`` (:data:`RULED`); None when
    there is none, or the call is outside what it covers.

    >>> x = torch.empty(2, 8, 4, 4, device="meta")
    >>> output_by_rule(aten.cat.default, ([x, x], 1), {}).shape
    (2, 16, 4, 4)
    """
    rule = _RULES.get(func)
    return rule(func, args, kwargs) if rule is not None else None


def _batch_norm(func: Any, args: tuple, kwargs: dict) -> tuple[Layout, ...] | None:
    """The normalised output takes the input's shape, strides and dtype; the saved mean and inverse standard
    deviation are one value per channel in the computation dtype (float32 for half precision). For a dense input
    in the standard or channels-last order, with one weight, bias and running statistic per channel or none."""
    arguments = func._schema.arguments
    if kwargs or len(args) != len(arguments):
        return None
    named = {argument.name: value for argument, value in zip(arguments, args, strict=True)}
    x, training = named["input"], named.get("training", False)
    if x.dim() < 2 or x.dtype not in _FLOATING or x.stride() not in _dense_strides(tuple(x.shape)):
        return None
    channels = x.shape[1]
    per_channel = x.numel() // channels if channels else 0
    # A training batch of one value per channel divides by zero for the unbiased variance: the kernel raises.
    if per_channel < (2 if training else 1):
        return None
    statistics = named.get("running_mean"), named.get("running_var")
    if statistics.count(None) == 1 or (not training and None in statistics):
        return None
    for tensor in (named["weight"], named["bias"], *statistics):
        if tensor is not None and (
            tuple(tensor.shape) != (channels,) or tensor.stride() != (1,) or tensor.dtype not in _FLOATING
        ):
            return None
    computation = torch.float32 if x.dtype in _HALF_PRECISION else x.dtype
    saved = Layout((channels,), (1,), computation)
    return Layout.of(x), saved, saved


def _dense_strides(shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The strides of a dense tensor of ``shape`` in the standard order, and in channels-last order (4-d)."""
    layouts = [tuple(make_contiguous_strides_for(shape))]
    if len(shape) == 4:
        layouts.append(tuple(make_channels_last_strides_for(shape)))
    return tuple(layouts)


def _elementwise(func: Any, args: tuple, kwargs: dict) -> Layout | None:
    """A tensor of the operands' broadcast shape and dtype, its dimensions ordered in memory as torch's
    elementwise kernels order them (``compute_elementwise_output_logical_to_physical_perm`` of the operands
    expanded to that shape). For tensors of one dtype, float32 or float64, and Python numbers, without
    ``alpha``."""
    if kwargs or len(args) != 2 or not isinstance(args[0], torch.Tensor):
        return None
    if func is aten.pow.Tensor_Scalar and args[1] == 1:  # the kernel returns a clone, which keeps the strides
        return None
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    if any(type(arg) not in (int, float) for arg in args if not isinstance(arg, torch.Tensor)):
        return None
    dtype = tensors[0].dtype
    if dtype not in _FULL_PRECISION or any(tensor.dtype != dtype for tensor in tensors):
        return None
    try:
        shape = tuple(torch.broadcast_shapes(*(tensor.shape for tensor in tensors)))
    except RuntimeError:
        return None
    order, _ = compute_elementwise_output_logical_to_physical_perm(
        *(tensor.expand(shape) for tensor in tensors)
    )
    physical = make_contiguous_strides_for([shape[dim] for dim in order]) if shape else ()
    strides = [0] * len(shape)
    for dim, stride in zip(order, physical, strict=True):
        strides[dim] = stride
    return Layout(shape, tuple(strides), dtype)


def _cat(func: Any, args: tuple, kwargs: dict) -> Layout | None:
    """The inputs' shape, summed along ``dim``, in their dtype, laid out in the memory format they suggest
    (channels-last when all of them do). For nonempty tensors of one floating dtype and rank."""
    if kwargs or not 1 <= len(args) <= 2:
        return None
    return _concatenated(args[0], args[1] if len(args) == 2 else 0)


def _concatenated(tensors: Sequence[torch.Tensor], dim: int) -> Layout | None:
    if not tensors or not all(isinstance(tensor, torch.Tensor) for tensor in tensors) or type(dim) is not int:
        return None
    first = tensors[0]
    rank, dtype = first.dim(), first.dtype
    if rank == 0 or not -rank <= dim < rank or dtype not in _FLOATING:
        return None
    dim %= rank
    for tensor in tensors:
        if tensor.dim() != rank or tensor.dtype != dtype or tensor.numel() == 0:
            return None
        if tensor.shape[:dim] != first.shape[:dim] or tensor.shape[dim + 1 :] != first.shape[dim + 1 :]:
            return None
    shape = (*first.shape[:dim], sum(tensor.shape[dim] for tensor in tensors), *first.shape[dim + 1 :])
    formats = {suggest_memory_format(tensor) for tensor in tensors}
    if formats == {torch.channels_last}:
        return Layout(shape, tuple(make_channels_last_strides_for(shape)), dtype)
    if formats == {torch.contiguous_format} or len(formats) > 1:
        return Layout(shape, tuple(make_contiguous_strides_for(shape)), dtype)
    return None  # channels-last 3-d: left to the kernel


def _stack(func: Any, args: tuple, kwargs: dict) -> Layout | None:
    """The inputs joined along a new dimension: as torch's reference does it, a ``cat`` along ``dim`` viewed
    with the new dimension, or, when ``dim`` is the last, a ``cat`` of the inputs with it added. For nonempty
    tensors of one floating dtype and shape."""
    if kwargs or not 1 <= len(args) <= 2:
        return None
    tensors, dim = args[0], args[1] if len(args) == 2 else 0
    if not tensors or not all(isinstance(tensor, torch.Tensor) for tensor in tensors) or type(dim) is not int:
        return None
    rank = tensors[0].dim()
    if not -(rank + 1) <= dim <= rank or any(tensor.shape != tensors[0].shape for tensor in tensors):
        return None
    dim %= rank + 1
    if dim == rank:
        return _concatenated([tensor.unsqueeze(dim) for tensor in tensors], dim)
    joined = _concatenated(tensors, dim)
    if joined is None:
        return None
    shape = (*tensors[0].shape[:dim], len(tensors), *tensors[0].shape[dim:])
    return Layout.of(joined.make().view(shape))


def _arange(func: Any, args: tuple, kwargs: dict) -> Layout | None:
    """``arange(end)``: ``ceil(end)`` values, in the dtype asked for, on meta."""
    if len(args) != 1 or type(args[0]) not in (int, float) or args[0] < 0 or not math.isfinite(args[0]):
        return None
    if kwargs.get("device") != torch.device("meta") or kwargs.get("layout") not in (None, torch.strided):
        return None
    dtype = kwargs.get("dtype")
    if dtype not in _FLOATING or kwargs.get("pin_memory") not in (None, False):
        return None
    return Layout((math.ceil(args[0]),), (1,), dtype)


_RULES: dict[Any, Callable[[Any, tuple, dict], Layout | tuple[Layout, ...] | None]] = {
    # The BatchNorm ops a forward reaches: F.batch_norm's, and those its decomposition calls.
    aten.native_batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit.default: _batch_norm,
    aten._native_batch_norm_legit.no_stats: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.add.Tensor: _elementwise,
    aten.sub.Tensor: _elementwise,
    aten.mul.Tensor: _elementwise,
    aten.div.Tensor: _elementwise,
    aten.pow.Tensor_Scalar: _elementwise,
    aten.cat.default: _cat,
    aten.stack.default: _stack,
    aten.arange.default: _arange,
}
RULED = frozenset(_RULES)  # the ops with a rule
