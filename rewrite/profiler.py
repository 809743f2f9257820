"""Params, FLOPs and MACs per module, per stage and in total, counted the way ``FlopCounterMode`` counts them.

``profile(model, example_inputs)`` runs the model's own eager ``forward`` (not an fx graph, so leaves and
untraceable code are counted too) under a dispatch mode that applies the formulas of
``torch.utils.flop_counter.flop_registry`` to every aten op, and charges each op to every module on the
module-call stack at that moment. It runs on the meta device whenever the model allows it, so profiling costs
shapes, not arithmetic; a model with data-dependent parts (NMS, ``nonzero``, a variable number of proposals) is
run once on its real inputs instead, and the profile says which module needed them.

Worked example (a convolution on 8x8 -> 6x6: 8 * 6 * 6 * 3 * 3 * 3 = 7,776 MACs; a linear 288 -> 10: 2,880 MACs):

>>> import torch
>>> from torch import nn
>>> from rewrite.graph import StageMap
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10))
>>> stages = StageMap({"0": "backbone", "3": "head"}, source="config", explanation="example")
>>> prof = profile(model, (torch.randn(1, 3, 8, 8),), stages=stages)
>>> prof.total, prof.total.macs
(Cost(params=3106, flops=21312), 10656)
>>> prof.modules["0"], prof.modules["3"], prof.modules[""] == prof.total
(Cost(params=216, flops=15552), Cost(params=2890, flops=5760), True)
>>> prof.stages  # ReLU and Flatten belong to no stage, but cost nothing: no "other"
{'backbone': Cost(params=216, flops=15552), 'head': Cost(params=2890, flops=5760)}
>>> prof.device, prof.needed_real_data
('meta', [])
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

from rewrite.errors import TraceError

if TYPE_CHECKING:
    from rewrite.graph import StageMap
    from rewrite.tracer import Leaf

__all__ = ["Cost", "Profile", "profile"]

OTHER = "other"
_STAGE_ORDER = ("backbone", "neck", "head")

aten = torch.ops.aten

# Metadata queries that FlopCounterMode hands back to the tensor (subclass) itself; mirrored so that inputs with a
# non-standard sizes/strides policy (nested tensors) behave exactly as under FlopCounterMode.
_METADATA_QUERIES = frozenset(
    getattr(getattr(namespace, op, None), overload, None)
    for namespace, op, overload in [
        (aten, "sym_is_contiguous", "default"),
        (aten, "is_contiguous", "default"),
        (aten, "is_contiguous", "memory_format"),
        (aten, "is_strides_like_format", "default"),
        (aten, "is_non_overlapping_and_dense", "default"),
        (aten, "size", "default"),
        (aten, "sym_size", "default"),
        (aten, "stride", "default"),
        (aten, "sym_stride", "default"),
        (aten, "storage_offset", "default"),
        (aten, "sym_storage_offset", "default"),
        (aten, "numel", "default"),
        (aten, "sym_numel", "default"),
        (aten, "dim", "default"),
        (torch.ops.prim, "layout", "default"),
    ]
) - {None}


@dataclass(frozen=True)
class Cost:
    """Parameter count and FLOPs (as ``FlopCounterMode`` counts them: 2 x multiply-accumulates)."""

    params: int
    flops: int

    @property
    def macs(self) -> int:
        return self.flops // 2

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(self.params + other.params, self.flops + other.flops)


@dataclass
class Profile:
    """What ``profile()`` measured.

    ``modules`` is hierarchical (a module's figure includes its children's; ``""`` is the root, equal to
    ``total``) and keyed by the module paths of ``model.named_modules()``. ``stages`` holds the stages that have
    parameters or FLOPs, ``"other"`` for those of modules in no stage. ``device`` is where the counting ran
    (``"meta"``, or the real device when some part needed real data); ``needed_real_data`` names that part.
    """

    total: Cost
    modules: dict[str, Cost]
    stages: dict[str, Cost]
    device: str
    needed_real_data: list[Leaf]


class _CallStack:
    """The module-call stack, kept by global forward (pre-)hooks so that the model itself is never touched."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.paths = {id(module): path for path, module in modules.items()}
        # A tuple, so that the counting mode can use the current stack itself as a dictionary key.
        self.stack: tuple[str, ...] = ()

    def enter(self, module: nn.Module, args: Any) -> None:
        path = self.paths.get(id(module))  # modules outside the model (built inside forward) are not charged
        if path is not None:
            self.stack += (path,)

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        path = self.paths.get(id(module))
        if path is not None and path in self.stack:
            # Cut at the last occurrence, not just the top: a child whose exception the parent caught never
            # ran its exit hook, and must not stay on the stack.
            self.stack = self.stack[: len(self.stack) - 1 - self.stack[::-1].index(path)]

    @property
    def innermost(self) -> str:
        return self.stack[-1] if self.stack else ""

    @contextmanager
    def hooked(self) -> Iterator[None]:
        self.stack = ()
        handles = [
            nn.modules.module.register_module_forward_pre_hook(self.enter),
            nn.modules.module.register_module_forward_hook(self.exit),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class _CountingMode(TorchDispatchMode):
    """FlopCounterMode's dispatch rule (same skips, same decomposition attempt, same formulas), but each op's FLOPs
    go to the current module-call stack, expanded to the modules on it once, afterwards."""

    def __init__(self, calls: _CallStack, registry: dict[Any, Callable[..., int]]) -> None:
        super().__init__()
        self.calls = calls
        self.registry = registry
        # FLOPs per module-call stack, the stack (a tuple) being the key: one cheap update per op.
        self.flops: defaultdict[tuple[str, ...], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        if func in _METADATA_QUERIES:
            return NotImplemented
        # As FlopCounterMode does: look the overload up in a registry keyed by packets (so, in effect, every op
        # but prim.device first tries its decomposition) and count the decomposed ops instead when there is one.
        if func not in self.registry and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.flops[self.calls.stack] += formula(*args, **kwargs, out_val=out)
        return out


def _real_data_registry() -> dict[Any, Any]:
    """FlopCounterMode's registry (as it stands now, custom formulas included) plus the CPU attention kernel: the
    registry knows the meta and CUDA kernels but not this one, and without it the same attention would cost its
    full FLOPs on meta and zero on CPU."""
    registry = flop_counter.flop_registry
    attention = registry[aten._scaled_dot_product_flash_attention]
    return {**registry, aten._scaled_dot_product_flash_attention_for_cpu: attention}


def profile(model: nn.Module, example_inputs: Any, *, stages: StageMap | None = None) -> Profile:
    """Params, FLOPs and MACs of ``model`` on ``example_inputs``: per module, per stage and in total.

    ``example_inputs`` are the positional arguments (a tuple; anything else is taken as the only argument).
    ``stages`` defaults to ``rewrite.graph.resolve_stages(model)``; an op belongs to the stage of the innermost
    module running it, a parameter to the stage of the module that owns it, and both go to ``"other"`` when that
    module is in no stage.

    The model runs once, on the meta device when it allows that (a model on a real device is given meta
    stand-ins of its parameters and buffers, never copies of them); when some part of it cannot run on meta, once
    more on the real inputs, and ``needed_real_data`` names the module that failed on meta and why. A model that
    is itself on meta and cannot run there raises :class:`~rewrite.errors.TraceError`, as does a model that fails
    on its real inputs too. The model is left as it was: no hooks, parameters, buffers or attributes change.

    FLOPs are ``FlopCounterMode``'s, with two differences that make the figures the same on every device:
    ``nn.MultiheadAttention``'s fused CPU fast path (which hides its matrix products from the dispatcher) is
    switched off while profiling, and the CPU flash-attention kernel, absent from the registry, is counted with
    the registry's own attention formula, as the meta and CUDA kernels are.
    """
    if stages is None:
        from rewrite.graph import resolve_stages  # lazily: graph.py pulls in tracing and networkx

        stages = resolve_stages(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    named = dict(model.named_modules())
    calls = _CallStack(named)

    def where(failure: _RunFailed) -> str:
        return f"{type(named[failure.path]).__name__} at {failure.path or '<root>'!r}"

    meta_state = {name: torch.empty_like(t, device="meta") for name, t in _state(model)}
    meta_args = tree_map_only(torch.Tensor, lambda t: torch.empty_like(t, device="meta"), args)
    try:
        mode = _run(model, meta_state, meta_args, calls, flop_counter.flop_registry)
        device, needed = "meta", []
    except _RunFailed as on_meta:
        real = _real_device(model, args)
        if real is None:
            raise TraceError(
                f"{where(on_meta)} cannot run on the meta device ({on_meta.reason}); "
                "pass the model and its inputs on a real device (cpu or cuda) so that it can run on real data"
            ) from on_meta.__cause__
        try:
            mode = _run_on_real_data(model, args, calls)
        except _RunFailed as on_real:
            raise TraceError(
                f"the model fails on its example inputs, in {where(on_real)}: {on_real.reason}"
            ) from on_real.__cause__
        from rewrite.tracer import Leaf  # lazily: only this path needs it, and trace.py imports much more

        device, needed = str(real), [Leaf(on_meta.path, type(named[on_meta.path]).__name__, on_meta.reason)]

    return _assemble(model, named, mode.flops, stages, device, needed)


class _RunFailed(Exception):
    """A run of the model failed; carries the innermost module on the call stack at that moment."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


def _run(
    model: nn.Module, state: dict[str, torch.Tensor], args: tuple, calls: _CallStack, registry: dict[Any, Any]
) -> _CountingMode:
    """One counted forward of ``model`` with ``state`` swapped in for its own tensors of those names."""
    mode = _CountingMode(calls, registry)
    try:
        with torch.no_grad(), _attributes_restored(calls.modules), calls.hooked(), mode:
            torch.func.functional_call(model, state, args, strict=False)
    except Exception as error:  # on meta any failure means "needs real data"; on real data the caller reports it
        raise _RunFailed(calls.innermost, _one_line(error)) from error
    return mode


def _run_on_real_data(model: nn.Module, args: tuple, calls: _CallStack) -> _CountingMode:
    """``_run`` on the real inputs and parameters, with copies of the buffers so that e.g. BatchNorm statistics in
    training mode stay untouched (a forward does not write parameters, so those are not copied)."""
    buffers = {name: t.clone() for name, t in model.named_buffers()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel hides its FLOPs; meta never uses it
    try:
        return _run(model, buffers, args, calls, _real_data_registry())
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _assemble(
    model: nn.Module,
    named: dict[str, nn.Module],
    flops_by_stack: dict[tuple[str, ...], int],
    stages: StageMap,
    device: str,
    needed: list[Leaf],
) -> Profile:
    """Turn FLOPs per call stack and the model's parameters into the hierarchical, per-stage figures."""
    params = dict.fromkeys(named, 0)
    credited: dict[int, set[str]] = {}  # a parameter shared by two modules counts once in each common ancestor
    for path, module in named.items():
        for p in module.parameters(recurse=False):
            seen = credited.setdefault(id(p), set())
            for ancestor in _ancestors(path):
                if ancestor not in seen:
                    seen.add(ancestor)
                    params[ancestor] += p.numel()

    flops = dict.fromkeys(named, 0)
    stage_flops: defaultdict[str, int] = defaultdict(int)
    stage_of: dict[str, str] = {}
    for stack, count in flops_by_stack.items():
        for path in set(stack):  # a module re-entered recursively is charged once per op, as FlopCounterMode does
            flops[path] += count
        innermost = stack[-1] if stack else ""
        if innermost not in stage_of:
            stage_of[innermost] = stages.stage_of(innermost) or OTHER
        stage_flops[stage_of[innermost]] += count

    stage_params: defaultdict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        stage_params[stages.stage_of(name.rpartition(".")[0]) or OTHER] += p.numel()

    # A stage occurs when something costs in it: a zero-cost "other" (a root that only flattens) is left out.
    occurring = {s for s in {*stage_flops, *stage_params} if stage_flops[s] or stage_params[s]}
    order = [s for s in _STAGE_ORDER if s in occurring] + sorted(occurring - {*_STAGE_ORDER, OTHER})
    order += [OTHER] if OTHER in occurring else []
    return Profile(
        total=Cost(sum(p.numel() for p in model.parameters()), sum(flops_by_stack.values())),
        modules={path: Cost(params[path], flops[path]) for path in named},
        stages={s: Cost(stage_params[s], stage_flops[s]) for s in order},
        device=device,
        needed_real_data=needed,
    )


@contextmanager
def _attributes_restored(modules: dict[str, nn.Module]) -> Iterator[None]:
    """Put back every module attribute that the forward replaced or refilled.

    Forwards that cache tensors on the module (YOLO-style ``self.grid[i] = ...``) would otherwise keep meta
    tensors after a meta run and break the next real forward. Lists and dicts are compared element by element
    (by identity: cheap, and tensors must not be compared by value) and restored in place, keeping their identity.
    """
    saved = [
        (attributes, {k: (v, copy.copy(v) if type(v) in (list, dict) else None) for k, v in attributes.items()})
        for attributes in (module.__dict__ for module in modules.values())
    ]
    try:
        yield
    finally:
        for attributes, before in saved:
            for key in attributes.keys() - before.keys():
                del attributes[key]
            for key, (value, contents) in before.items():
                attributes[key] = value
                if contents is not None and not _same_items(value, contents):
                    value.clear()
                    if isinstance(value, list):
                        value.extend(contents)
                    else:
                        value.update(contents)


def _same_items(now: list | dict, before: list | dict) -> bool:
    if len(now) != len(before):
        return False
    if isinstance(now, dict):
        return all(k in now and now[k] is v for k, v in before.items())
    return all(a is b for a, b in zip(now, before))


def _state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _real_device(model: nn.Module, args: tuple) -> torch.device | None:
    """The device a real run would use, or None when the model or its inputs are on meta (no data to run on)."""
    tensors = [t for _, t in _state(model)]
    tensors += [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
    if any(t.is_meta for t in tensors):
        return None
    return tensors[0].device if tensors else torch.device("cpu")


def _ancestors(path: str) -> Iterator[str]:
    """``path`` itself, then each enclosing module path, ending with the root ``""``."""
    while path:
        yield path
        path = path.rpartition(".")[0]
    yield ""


def _one_line(error: BaseException) -> str:
    """``Type: first sentence`` of an error: torch's meta errors go on with advice that does not apply here."""
    text = str(error).strip().split("\n", 1)[0]
    if not text:
        return type(error).__name__
    sentence = text.split(". ", 1)[0]
    return f"{type(error).__name__}: {sentence if sentence == text else sentence + '.'}"
