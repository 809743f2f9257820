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

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import flop_counter

from rewrite.errors import TraceError
from rewrite.execution import Outcome, RunFailed, Runner, model_lock, on_meta_else_real, working_copy
from rewrite.meta_ops import UncompiledDispatchMode, meta_op_signature, meta_output, remember_meta_output
from rewrite.meta_rules import RULED
from rewrite.paths import join_path, parent_path, path_and_ancestors
from rewrite.region import held_path
from rewrite.tracer import Leaf

if TYPE_CHECKING:
    from rewrite.graph import StageMap

__all__ = ["Cost", "Profile", "profile", "profile_and_outputs"]

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
        self.paths: dict[int, str] = {}
        for path, module in modules.items():
            self.paths.setdefault(id(module), path)
        # A tuple, so that the counting mode can use the current stack itself as a dictionary key.
        self.stack: tuple[str, ...] = ()
        self.thread = threading.get_ident()  # the thread whose calls are counted
        # Per holder path, the name of each of its direct children, by identity (see _held_path).
        self.children: dict[str, dict[int, str]] = {}

    def enter(self, module: nn.Module, args: Any) -> None:
        path = self.paths.get(id(module))  # modules outside the model (built inside forward) are not charged
        if path is None or threading.get_ident() != self.thread:  # the hooks are global; the count is ours
            return
        if self.stack:  # credited to the path it is called through (see rewrite.region.held_path)
            held = self._held_path(self.stack[-1], module)
            path = join_path(self.stack[-1], held) if held is not None else path
        self.stack += (path,)

    def _held_path(self, holder_path: str, module: nn.Module) -> str | None:
        """``held_path(holder, module)``, a direct child's name looked up rather than searched for: a holder of
        thousands of children (one ``nn.Sequential``) calls each of them."""
        holder = self.modules[holder_path]
        names = self.children.get(holder_path)
        if names is None:
            names = self.children[holder_path] = {}
            for name, child in holder._modules.items():
                names.setdefault(id(child), name)
        name = names.get(id(module))
        if name is not None and holder._modules.get(name) is module:
            return name
        return held_path(holder, module)

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) not in self.paths or threading.get_ident() != self.thread:
            return
        # Cut at the innermost call of this module, not just the top: a child whose exception the parent caught
        # never ran its exit hook, and must not stay on the stack.
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.modules.get(self.stack[depth]) is module:
                self.stack = self.stack[:depth]
                return

    @contextmanager
    def hooked(self) -> Iterator[None]:
        self.stack = ()
        self.thread = threading.get_ident()
        self.children = {}
        handles = [
            nn.modules.module.register_module_forward_pre_hook(self.enter),
            nn.modules.module.register_module_forward_hook(self.exit),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class _CountingMode(UncompiledDispatchMode):
    """FlopCounterMode's dispatch rule (same skips, same decomposition attempt, same formulas), but each op's FLOPs
    go to the current module-call stack, expanded to the modules on it once, afterwards."""

    def __init__(self, calls: _CallStack, registry: dict[Any, Callable[..., int]]) -> None:
        super().__init__()
        self.calls = calls
        self.registry = registry
        # FLOPs per module-call stack, the stack (a tuple) being the key: one cheap update per op.
        self.flops: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self.memo = _flops_memo(registry)  # FLOPs per meta op signature (rewrite.meta_ops.meta_op_signature)
        self.uncounted = _uncounted(registry)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA_QUERIES:
            return NotImplemented
        # On meta, an op's output and FLOPs follow from its signature: counted once, then charged again.
        signature = meta_op_signature(func, args, kwargs)
        if signature is None:
            return self._count(func, args, kwargs)
        made, flops = meta_output(signature, args, kwargs), self.memo.get(signature)
        if made is not None and flops is None and func in self.uncounted:
            flops = self.memo[signature] = 0
        if made is not None and flops is not None:
            self.flops[self.calls.stack] += flops
            return made.make()
        stack = self.calls.stack
        before = self.flops[stack]
        out = self._count(func, args, kwargs)
        if remember_meta_output(signature, out, args, kwargs):
            self.memo[signature] = self.flops[stack] - before
        return out

    def _count(self, func: Any, args: tuple, kwargs: dict) -> Any:
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


# The FLOPs of each meta op signature, under the registry they were counted with: (that registry, the FLOPs).
_FLOPS_MEMO: tuple[frozenset, dict[tuple, int]] = (frozenset(), {})


def _flops_memo(registry: dict[Any, Callable[..., int]]) -> dict[tuple, int]:
    """The FLOPs memo for ``registry``: kept from profile to profile while the formulas stay the same."""
    global _FLOPS_MEMO
    formulas = frozenset(registry.items())
    if _FLOPS_MEMO[0] != formulas:
        _FLOPS_MEMO = (formulas, {})
    return _FLOPS_MEMO[1]


def _uncounted(registry: dict[Any, Callable[..., int]]) -> frozenset:
    """The ops whose meta outputs follow from rules (rewrite.meta_rules.RULED), which count no FLOPs under
    ``registry`` when it has a formula for none of them, as FlopCounterMode's has not (nor has any of them a
    decomposition into ops with one): they need not run to be counted."""
    if any(op._overloadpacket in registry for op in RULED):
        return frozenset()
    return RULED


def _flop_registry() -> dict[Any, Any]:
    """FlopCounterMode's registry (as it stands now, custom formulas included) plus the CPU attention kernel: the
    registry knows the meta and CUDA kernels but not this one, and without it the same attention would cost its
    full FLOPs on meta and zero on CPU."""
    registry = flop_counter.flop_registry
    attention = registry[aten._scaled_dot_product_flash_attention]
    return {**registry, aten._scaled_dot_product_flash_attention_for_cpu: attention}


def profile(model: nn.Module, example_inputs: Any, *, stages: StageMap | None = None) -> Profile:
    """Params, FLOPs and MACs of ``model`` on ``example_inputs``: per module, per stage and in total.

    ``example_inputs`` are the positional arguments (a tuple; anything else is taken as the only argument).
    ``stages`` defaults to ``rewrite.graph.resolve_stages(model, example_inputs=example_inputs)``; an op
    belongs to the stage of the innermost module running it, a parameter to the stage of the module that owns
    it, and both go to ``"other"`` when that module is in no stage.

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
    return profile_and_outputs(model, example_inputs, stages=stages)[0]


def profile_and_outputs(
    model: nn.Module, example_inputs: Any, *, stages: StageMap | None = None
) -> tuple[Profile, Outcome[Any]]:
    """:func:`profile`, and what the model returned in the run that was counted (meta tensors when it ran on
    meta): a caller that checks the outputs' shapes needs no run of its own."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    model = working_copy(model)  # run in place of the user's, which other threads may be running
    if stages is None:
        from rewrite.graph import resolve_stages  # lazily: graph.py pulls in networkx

        stages = resolve_stages(model, example_inputs=args)
    named = dict(model.named_modules(remove_duplicate=False))  # every name a call may be credited to
    calls = _CallStack(named)
    registry = _flop_registry()

    def count(runner: Runner) -> tuple[_CountingMode, Any]:
        mode = _CountingMode(calls, registry)
        with _mha_fastpath_disabled(), calls.hooked(), mode:
            outputs = runner.run(model, args)
        return mode, outputs

    try:
        with model_lock(model):
            counted = on_meta_else_real(model, args, count)
    except RunFailed as failure:
        if failure.on_meta:
            raise TraceError(
                f"{failure.where} cannot run on the meta device ({failure.reason}); "
                "pass the model and its inputs on a real device (cpu or cuda) so that it can run on real data"
            ) from failure.error
        raise TraceError(
            f"the model fails on its example inputs, in {failure.where}: {failure.reason}"
        ) from failure.error
    failure = counted.meta_failure
    needed = [] if failure is None else [Leaf(failure.path, failure.type_name, failure.reason)]
    mode, outputs = counted.value
    figures = _assemble(model, named, mode.flops, stages, str(counted.device), needed)
    return figures, Outcome(outputs, counted.device, failure)


@contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """``nn.MultiheadAttention``'s fused CPU fast path, switched off: it hides its matrix products from the
    dispatcher, and meta runs never take it."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


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
    # A parameter shared by two modules counts once in each common ancestor.
    credited: dict[int, set[str]] = {}
    for path, module in named.items():
        for p in module._parameters.values():  # a parameter held twice is credited once: by ``seen``
            if p is None:
                continue
            seen = credited.setdefault(id(p), set())
            for ancestor in path_and_ancestors(path):
                if ancestor not in seen:
                    seen.add(ancestor)
                    params[ancestor] += p.numel()

    flops = dict.fromkeys(named, 0)
    stage_flops: defaultdict[str, int] = defaultdict(int)
    stage_of: dict[str, str] = {}
    for stack, count in flops_by_stack.items():
        # A module re-entered recursively is charged once per op, as FlopCounterMode does.
        for path in set(stack):
            flops[path] += count
        innermost = stack[-1] if stack else ""
        if innermost not in stage_of:
            stage_of[innermost] = stages.stage_of(innermost) or OTHER
        stage_flops[stage_of[innermost]] += count

    stage_params: defaultdict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        stage_params[stages.stage_of(parent_path(name)) or OTHER] += p.numel()

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
