"""Run a model on meta stand-ins of its weights, or else on its real data, and leave it exactly as it was.

Tracing, profiling and the shape check of a rewrite all run the user's model, and none may pay for its
arithmetic or change it. On the meta device a run costs shapes, not arithmetic: for the call only, every
parameter and buffer is replaced by an uninitialised meta tensor of its shape (``torch.func.functional_call``,
so no weight is copied), and the tensor inputs are moved to meta. A model that cannot run on meta
(``nonzero``, NMS, ``.item()``: results that depend on the values) runs once more on its real inputs and
parameters, with scratch copies of the buffers so that train-mode BatchNorm statistics stay untouched.

Either way the model is left as it was: module attributes that the forward replaced or refilled (forward-time
caches such as YOLO's ``Detect.grid``) are put back, no gradient is recorded, and the random generators are
restored. A failed run raises :class:`RunFailed`, which names the innermost of the model's modules running.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).train()
>>> outcome = run(model, (torch.randn(5, 4),))
>>> outcome.device, outcome.value.shape, outcome.meta_failure
(device(type='meta'), torch.Size([5, 8]), None)
>>> int(model[1].num_batches_tracked)  # the train-mode BatchNorm ran on stand-ins: its statistics stayed
0

A model with a part that needs real data runs again on the real data, and the outcome says where meta failed:

>>> class Positive(nn.Module):
...     def forward(self, x):
...         return x[x > 0]  # how many elements: only the values can tell
>>> model = nn.Sequential(nn.Linear(4, 4), Positive())
>>> outcome = run(model, (torch.randn(5, 4),))
>>> outcome.device, outcome.meta_failure.where
(device(type='cpu'), "Positive at '1'")

With the model (or its inputs) on meta there is no real data to fall back to, and the meta failure is final:

>>> try:
...     run(model.to("meta"), (torch.randn(5, 4),))
... except RunFailed as failure:
...     print(failure.on_meta, failure.where)
True Positive at '1'

A caller that runs the model more than once, or under hooks or a dispatch mode of its own, hands over the
whole attempt, which starts again from scratch on real data when one of its runs fails on meta:

>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
>>> x = torch.randn(1, 3, 8, 8)
>>> on_meta_else_real(model, x, lambda runner: runner.run(model[0], (x,)).shape).value
torch.Size([1, 8, 6, 6])
"""

from __future__ import annotations

import contextlib
import copy
import gc
import operator
import os
import threading
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.utils import _pytree as pytree

from rewrite.errors import one_line
from rewrite.meta_ops import MetaOpMemo

__all__ = [
    "Outcome",
    "RunFailed",
    "Runner",
    "attributes_restored",
    "buffer_values_restored",
    "full_collections_deferred",
    "is_small_constant",
    "meta_empty_like",
    "meta_memo",
    "model_lock",
    "on_meta_else_real",
    "physical_memory",
    "run",
    "working_copy",
]

T = TypeVar("T")

_SMALL_CONSTANT = (
    16  # elements: cached CPU tensors this small are constants read as numbers, kept on meta runs
)


class RunFailed(Exception):
    """A run raised ``error`` while the model's module at ``path`` was the innermost one running.

    ``on_meta`` says whether the run was on meta stand-ins; ``reason`` is :func:`one_line` of ``error``.
    """

    def __init__(self, error: Exception, *, path: str, type_name: str, on_meta: bool) -> None:
        self.error = error
        self.path = path
        self.type_name = type_name
        self.on_meta = on_meta
        self.reason = one_line(error)
        device = "the meta device" if on_meta else "real data"
        super().__init__(f"{self.where} fails on {device}: {self.reason}")

    @property
    def where(self) -> str:
        """The failing module, for a message: ``Inner at 'block.1'`` (``'<root>'`` for the model itself)."""
        return f"{self.type_name} at {self.path or '<root>'!r}"


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What :func:`on_meta_else_real` and :func:`run` give back."""

    value: T  # what the attempt returned (for run: the model's outputs, meta tensors when it ran on meta)
    device: torch.device  # where it ran: meta, or the device of the real data
    meta_failure: RunFailed | None  # why it could not run on meta; None when it did


class Runner:
    """Runs the modules of one model on meta stand-ins of its parameters and buffers, or on its real weights.

    On meta, every parameter and buffer is swapped for a meta tensor of its shape, and tensor inputs are moved
    to meta; on real data, only the buffers are swapped, for scratch copies. The stand-ins are made once, so
    that the many runs of one model (a traced region at a time) share them.
    """

    def __init__(self, model: nn.Module, *, on_meta: bool, keep_small_constants: bool = False) -> None:
        self.model = model
        self.on_meta = on_meta
        self.keep_small_constants = keep_small_constants  # see is_small_constant
        parameters, buffers = list(model.parameters()), list(model.buffers())
        # Keyed by identity: a region's graph module reaches the model's tensors under other names.
        if on_meta:
            self._stand_ins = {id(t): meta_empty_like(t) for t in parameters + buffers}
        else:  # a forward does not write its parameters, so those need no copies
            self._stand_ins = {id(t): t.clone() for t in buffers}
        self._cuda_devices = sorted({t.device.index or 0 for t in parameters + buffers if t.is_cuda})

    def run(self, module: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> Any:
        """``module(*args, **kwargs)`` on the stand-ins; raises :class:`RunFailed` when the call raises.

        ``module`` is the model, one of its submodules, or a module that calls the model's modules (a traced
        region). What the call does to the attributes of the model's modules is undone; a ``module`` outside
        the model keeps what it recorded during the call.
        """
        args, kwargs = self._inputs(tuple(args)), self._inputs(kwargs or {})
        try:
            # Dropout draws from the global random generators: forked, so that a run leaves them as they were.
            # The stand-ins are swapped into the model's own modules: one run at a time per model.
            with (
                model_lock(self.model),
                attributes_restored(self.model) as attributes,
                torch.no_grad(),
                torch.random.fork_rng(self._cuda_devices),
                self._stand_ins_swapped(module),
            ):
                if self.on_meta:
                    _cached_tensors_to_meta(attributes, keep_small_constants=self.keep_small_constants)
                # A caller's own dispatch mode (the profiler's) sees every op as it is: it memoizes itself.
                memoized = self.on_meta and not _dispatch_modes_active()
                with MetaOpMemo() if memoized else contextlib.nullcontext():
                    return module(*args, **kwargs)
        except Exception as error:
            path = self._innermost_module_path(error)
            type_name = type(self.model.get_submodule(path)).__name__
            raise RunFailed(error, path=path, type_name=type_name, on_meta=self.on_meta) from error

    @contextlib.contextmanager
    def _stand_ins_swapped(self, module: nn.Module) -> Iterator[None]:
        """The stand-ins in place of the model's parameters and buffers wherever ``module`` holds them, for the
        call: what ``torch.func.functional_call`` does, without its walks of the module tree by name."""
        swapped = [
            (table, name, tensor)
            for submodule in module.modules()
            for table in (submodule._parameters, submodule._buffers)
            for name, tensor in table.items()
            if id(tensor) in self._stand_ins
        ]
        try:
            for table, name, tensor in swapped:
                table[name] = self._stand_ins[id(tensor)]
            yield
        finally:
            for table, name, tensor in swapped:
                table[name] = tensor

    def _inputs(self, value: Any) -> Any:
        if not self.on_meta:
            return value
        return pytree.tree_map_only(torch.Tensor, meta_empty_like, value)

    def _innermost_module_path(self, error: BaseException) -> str:
        """The path of the innermost of the model's modules with a method on ``error``'s traceback (else "").

        Read off the traceback rather than kept with module hooks, so that a run that succeeds pays nothing.
        """
        paths = {id(module): path for path, module in self.model.named_modules()}
        innermost = ""
        for frame, _ in traceback.walk_tb(error.__traceback__):  # outermost first
            innermost = paths.get(id(frame.f_locals.get("self")), innermost)
        return innermost


def _dispatch_modes_active() -> bool:
    return torch._C._len_torch_dispatch_stack() > 0


def meta_empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(tensor, device="meta")``, made directly when ``tensor`` is a contiguous meta tensor:
    there, ``empty_like`` runs Python (a tenth of a millisecond), and a model's stand-ins number in thousands.

    >>> weight = torch.empty(8, 3, 3, 3, device="meta")
    >>> meta_empty_like(weight).stride() == torch.empty_like(weight, device="meta").stride()
    True
    """
    if (
        tensor.is_meta
        and type(tensor) in (torch.Tensor, nn.Parameter)
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
    ):
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    return torch.empty_like(tensor, device="meta")


def _cached_tensors_to_meta(attributes: list[dict[str, Any]], *, keep_small_constants: bool) -> None:
    """Swap the tensors a forward cached outside parameters and buffers (plain attributes, and the items of
    lists and dicts held in them: anchor grids and the like) for meta ones, so that a meta run does not mix them
    with meta weights. ``attributes``: the ``__dict__`` of each module, as :func:`attributes_restored` gives
    them, which puts the originals back."""

    def to_meta(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or (keep_small_constants and is_small_constant(value)):
            return value
        return meta_empty_like(value)

    for bindings in attributes:
        # nn.Module's own tables (underscored) are left alone: parameters and buffers have stand-ins already.
        for name in [
            name
            for name, value in bindings.items()
            if not name.startswith("_") and isinstance(value, _CACHES)
        ]:
            value = bindings[name]
            if isinstance(value, torch.Tensor):
                bindings[name] = to_meta(value)
            elif isinstance(value, list):
                value[:] = [to_meta(item) for item in value]
            else:
                value.update((key, to_meta(item)) for key, item in value.items())


_CACHES = (torch.Tensor, list, dict)  # what a cached tensor is held in: itself, or a list or dict of them


def is_small_constant(tensor: torch.Tensor) -> bool:
    """Whether a tensor that a forward keeps outside parameters and buffers may be a constant read as a number:
    a small CPU tensor (strides, scales), which code reads with ``.item()`` or ``new_full(..., stride[i])``.

    A meta run first moves every such tensor to meta; when that run fails, it tries again with the small CPU
    constants left real (an element of one is a 0-d CPU tensor, which goes with tensors on any device), before
    falling back to real data.
    """
    return tensor.device.type == "cpu" and tensor.numel() <= _SMALL_CONSTANT


def _has_small_constants(model: nn.Module) -> bool:
    for module in model.modules():
        for name, value in vars(module).items():
            if name.startswith("_"):
                continue
            items = (
                value.values() if isinstance(value, dict) else value if isinstance(value, list) else (value,)
            )
            if any(isinstance(item, torch.Tensor) and is_small_constant(item) for item in items):
                return True
    return False


def on_meta_else_real(model: nn.Module, inputs: Any, attempt: Callable[[Runner], T]) -> Outcome[T]:
    """``attempt`` with a meta :class:`Runner` of ``model``, and after a failure there, with a real one.

    ``attempt`` makes its runs (one or many) through the runner it is given, and starts again from scratch on
    real data when one of them fails on meta. ``inputs`` (the model's inputs, in any nesting) are looked at
    only to tell whether there is real data: there is none when they or the model hold a meta tensor.

    Raises the :class:`RunFailed` of the meta attempt when there is no real data, and that of the real attempt
    when the model fails on real data too.
    """
    try:
        return Outcome(attempt(Runner(model, on_meta=True)), torch.device("meta"), None)
    except RunFailed as failure:
        meta_failure = failure
    if _has_small_constants(model):
        with contextlib.suppress(RunFailed):
            runner = Runner(model, on_meta=True, keep_small_constants=True)
            return Outcome(attempt(runner), torch.device("meta"), None)
    device = real_data_device(model, inputs)
    if device is None:
        raise meta_failure
    return Outcome(attempt(Runner(model, on_meta=False)), device, meta_failure)


def run(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> Outcome[Any]:
    """``model(*args, **kwargs)`` on meta stand-ins, or on the real data when the model cannot run on meta.

    That is, ``on_meta_else_real(model, (args, kwargs), lambda runner: runner.run(model, args, kwargs))``.
    """
    return on_meta_else_real(model, (args, kwargs), lambda runner: runner.run(model, args, kwargs))


def real_data_device(model: nn.Module, inputs: Any) -> torch.device | None:
    """The device of the model's first tensor (else of the inputs', else cpu); None when any is on meta."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    if any(t.is_meta for t in tensors):
        return None
    return tensors[0].device if tensors else torch.device("cpu")


@contextlib.contextmanager
def attributes_restored(model: nn.Module) -> Iterator[list[dict[str, Any]]]:
    """Undo what a forward or an fx trace does to the attributes of ``model``'s modules; gives their
    ``__dict__`` (each module's once).

    Models cache into their modules while running (YOLO's ``Detect`` keeps grids in a list attribute, which a
    meta run would leave holding meta tensors), and fx parks constants on the traced module. Attribute
    bindings are restored, and so are the items of the attributes that are lists or dicts, in place (which
    also covers parameters, buffers, submodules and hooks).

    >>> cache = nn.Module()
    >>> cache.grids = [torch.zeros(1)]
    >>> with attributes_restored(cache):
    ...     cache.grids[0] = torch.zeros(1, device="meta")
    ...     cache.scale = 2.0
    >>> cache.grids[0].device, hasattr(cache, "scale")
    (device(type='cpu'), False)
    """
    snapshot = _AttributeSnapshot(model)
    try:
        yield [attributes for attributes, _ in snapshot.bindings]
    finally:
        snapshot.restore()


class _AttributeSnapshot:
    """The attribute bindings of a model's modules, and the items of those attributes that are lists or dicts.

    A model holds tens of attributes per module, nearly all of them unchanged by a run and most of them empty
    hook dicts: the restore tells what changed with whole-container comparisons (by identity) and touches only
    that, so that a run does not pay Python per attribute.
    """

    def __init__(self, model: nn.Module) -> None:
        self.bindings = [(module.__dict__, module.__dict__.copy()) for module in model.modules()]
        containers = [
            value
            for _, bindings in self.bindings
            for value in bindings.values()
            if isinstance(value, (list, dict))
        ]
        self.filled = [(container, container.copy()) for container in containers if container]
        self.empty = [container for container in containers if not container]

    def restore(self) -> None:
        # Entry by entry, never emptied first: another thread reading the module meanwhile sees each entry
        # either before or after, never missing.
        for attributes, bindings in self.bindings:
            if _changed(attributes, bindings):
                _restore_dict(attributes, bindings)
        for container, items in self.filled:
            if isinstance(container, list):
                if len(container) != len(items) or any(map(operator.is_not, container, items)):
                    container[:] = items
            elif _changed(container, items):
                _restore_dict(container, items)
        if any(self.empty):
            for container in self.empty:
                if isinstance(container, list):
                    container.clear()
                elif container:
                    _restore_dict(container, {})


def _changed(target: dict, saved: dict) -> bool:
    """Whether ``target`` differs from ``saved``: other keys, or another object under one of them."""
    return (
        len(target) != len(saved)
        or any(map(operator.is_not, target.values(), saved.values()))
        or target.keys() != saved.keys()
    )


_WORKING_COPIES: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def working_copy(model: nn.Module, *, handed_over: bool = False) -> nn.Module:
    """A copy of ``model``'s module tree that shares its parameters and holds copies of its buffers and cached
    tensors: what tracing, profiling and planning run on, so that the user's modules are never swapped,
    hooked or written while other threads use them.

    A working copy is its own working copy. A model that cannot be deep-copied is worked on as it is (its runs
    then swap stand-ins into its own modules for the call, under :func:`model_lock`). ``handed_over``: the
    caller made ``model`` and no user holds it (the planner's rewritten copy): it is a working copy as it is.

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    >>> work = working_copy(model)
    >>> work[0].weight is model[0].weight, work[1].running_mean is model[1].running_mean
    (True, False)
    >>> working_copy(work) is work
    True
    """
    if handed_over:
        _WORKING_COPIES.add(model)
    if model in _WORKING_COPIES:
        return model
    shared: dict[int, object] = {id(parameter): parameter for parameter in model.parameters()}
    _seed_empty_containers(model, shared)
    try:
        work = copy.deepcopy(model, shared)
    except Exception:  # noqa: BLE001 -- whatever a module holds that cannot be copied: work on the model itself
        return model
    _WORKING_COPIES.add(work)
    return work


_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_LOCK = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that this library's runs and traces of ``model`` hold while they swap stand-ins or attributes into
    its modules, so that two threads planning the same model do not see each other's stand-ins."""
    with _MODEL_LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def full_collections_deferred() -> Iterator[None]:
    """Python's full garbage collections held off while the body runs; young objects are collected as usual.

    Planning builds and copies hundreds of thousands of objects (modules, their tables, traced graphs) that live
    as long as the plan, and each full collection walks every one of them: a quarter of a large plan's time.
    The oldest generation's threshold is put back when the outermost of nested or concurrent bodies ends, and
    whatever garbage it holds is collected at the next full collection after that.
    """
    global _DEFERRING, _THRESHOLDS
    with _DEFERRAL_LOCK:
        if _DEFERRING == 0:
            _THRESHOLDS = gc.get_threshold()
            gc.set_threshold(*_THRESHOLDS[:2], _NO_FULL_COLLECTION)
        _DEFERRING += 1
    try:
        yield
    finally:
        with _DEFERRAL_LOCK:
            _DEFERRING -= 1
            if _DEFERRING == 0:
                gc.set_threshold(*_THRESHOLDS)


_DEFERRAL_LOCK = threading.Lock()
_DEFERRING = 0  # bodies running under full_collections_deferred
_THRESHOLDS: tuple[int, ...] = ()  # the thresholds before the first of them
_NO_FULL_COLLECTION = 1 << 30  # young-generation collections between full ones: none in practice


def _restore_dict(target: dict, saved: dict) -> None:
    for key in [key for key in target if key not in saved]:
        del target[key]
    for key, value in saved.items():
        if target.get(key, _MISSING) is not value:
            target[key] = value


_MISSING = object()


def meta_memo(model: nn.Module) -> dict[int, object]:
    """A ``copy.deepcopy`` memo that turns every tensor the model holds into an empty meta tensor of the same kind:
    ``copy.deepcopy(model, meta_memo(model))`` is a weight-free copy.

    Besides parameters and buffers, that covers tensors a forward cached in plain attributes, lists or dicts
    (anchor grids and the like), which would otherwise stay on the real device beside meta weights.
    """
    memo: dict[int, object] = {}
    _seed_empty_containers(model, memo)
    for module in model.modules():
        for name, value in vars(module).items():
            weights = name in ("_parameters", "_buffers")
            for tensor in _held(value):
                if not isinstance(tensor, torch.Tensor) or id(tensor) in memo:
                    continue
                # Small cached constants stay real, as meta runs keep them when they must (rewrite.execution).
                if weights or not is_small_constant(tensor):
                    memo[id(tensor)] = _meta_like(tensor)
    return memo


def _seed_empty_containers(model: nn.Module, memo: dict[int, object]) -> None:
    """Enter a new empty container into a ``copy.deepcopy`` memo for each empty one that the model's modules
    hold, nearly all of them hook tables: what ``deepcopy`` makes of them, without its generic protocol (a
    reduce and a rebuild each)."""
    for module in model.modules():
        for value in vars(module).values():
            kind = type(value)
            if kind in _PLAIN_CONTAINERS and not value and not (kind is OrderedDict and vars(value)):
                memo[id(value)] = kind()


_PLAIN_CONTAINERS = frozenset({dict, OrderedDict, list, set})


def _held(value: object) -> Iterable[object]:
    """What an attribute holds: a dict's values, a list's or tuple's items, or the value itself."""
    if isinstance(value, dict):
        return value.values()
    if isinstance(value, (list, tuple)):
        return value
    return (value,)


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    empty = meta_empty_like(tensor)
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(empty, requires_grad=tensor.requires_grad)
    return empty


@contextlib.contextmanager
def buffer_values_restored(model: nn.Module) -> Iterator[None]:
    """Put back the values of ``model``'s buffers that code inside changed in place.

    fx runs the non-traced parts of a forward for real while it traces: a forward that counts its calls in a
    buffer (``self.calls += 1``), or a hand-written BatchNorm updating its statistics in train mode, writes into
    the real buffers. Only buffers whose version counter moved are copied back.

    >>> counter = nn.Module()
    >>> counter.register_buffer("calls", torch.zeros((), dtype=torch.long))
    >>> with buffer_values_restored(counter):
    ...     counter.calls += 1
    >>> int(counter.calls)
    0
    """
    saved = [(buffer, buffer._version, buffer.clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, version, value in saved:
                if buffer._version != version:
                    buffer.copy_(value)


def physical_memory() -> int | None:
    """This machine's memory in bytes, where the platform says (POSIX): what an input may take at most.

    Sizes are checked against it before allocating: with overcommit an allocation may succeed and the kernel
    kill the process on first touch.
    """
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
