"""Tracing that never gives up on a whole model.

``torch.fx.symbolic_trace`` stops at the first line it cannot record: a data-dependent ``if``, a loop over a
tensor, ``len()`` of a shape, a type check on an input. Real detectors are full of such lines (YOLO's
``Detect``, torchvision's image lists, anchor generators and post-processing). :func:`trace` keeps the failing
code as opaque calls, as small as possible, and still exposes every module around and below them.

How a model is cut into graphs
------------------------------
1. The root's ``forward`` is traced with a ``torch.fx.Tracer`` whose ``concrete_args`` follow the example
   inputs: tensors become placeholders, lists / tuples / dicts of tensors become that structure of
   placeholders, and every other value (``None``, flags, sizes) is fixed to the value given. Arguments left
   out keep their defaults, fixed too (so ``targets=None`` takes the inference branch).
2. When tracing raises inside a submodule, the innermost module whose *own* ``forward`` raised becomes a leaf
   (one ``call_module`` node) and the trace starts again. ``Leaf.reason`` keeps the error on one line.
   Modules named in ``leaf_modules`` (by path or class) are leaves from the start, with reason ``"user"``;
   ``torch.nn`` built-ins other than containers are leaves as in ``torch.fx``, and so is every module that
   :mod:`rewrite.vocabulary` puts in a category (torchvision's ``FrozenBatchNorm2d``, timm's ``Conv2dSame``),
   so that a rule's chain sees one step where fx would record its arithmetic (none of these are listed in
   ``Traced.leaves``).
3. A module whose own ``forward`` cannot be traced is *opaque*: the root when its forward fails, or any
   automatic leaf. Its inside stays visible: the opaque module runs once, eagerly, on its inputs (the example
   inputs for the root; for a leaf, what it received when its region ran), while forward pre-hooks record
   the inputs of the first call of every module below it. Each module it calls directly (a child, or one
   held in its ``ModuleList``) is traced as its own :class:`Region` on those inputs, by these same rules, so
   an opaque module found there is opened in turn. A ``torch.nn`` built-in, user leaf or opaque module called
   directly by an opaque module (the ``Conv2d`` layers of a YOLO ``Detect``, a ``C2f`` block called by an
   opaque detector) gets a one-node region, ``output(module(*inputs))``, so its own call is still there to
   match, with its own input and output. User leaves are never opened, and a module that is never called
   gets no region. ``Traced.opaque_calls`` counts the calls that opaque modules made of each module: only the
   first has a region.

Every node carries a :class:`~rewrite.facts.NodeFacts` (read with :func:`~rewrite.facts.facts`): the module
calls that enclosed it, each a path, a class name and a call id; and, once its region ran, fx's
``tensor_meta`` (read flattened with :func:`~rewrite.facts.shapes` and :func:`~rewrite.facts.dtypes`; see
``docs/design.md``). A module's path is the one *it was called through*: its caller's path joined with the name
under which the caller holds it (see :func:`~rewrite.region.held_path`), so an activation object that every
block shares is ``model.10.act`` in ``model.10``, not the path it was first registered under. A call id is a
:class:`~rewrite.facts.CallId` ``(path, n)``: the ``n``-th call of the module at ``path`` (the root's call is
``("", 0)``, printed ``@0``), so two calls of a shared module differ.

Shapes are found by running each region on its inputs on meta stand-ins of the weights (see
:mod:`rewrite.execution`). When some part of the model cannot run on meta (``nonzero``, NMS, ``.item()``), the
whole trace starts again with every run on the real weights, with scratch copies of the buffers so that
BatchNorm statistics stay untouched. The model is never modified: its attributes are restored after every
trace and run, and no hook is left behind.

>>> import torch
>>> from torch import nn
>>> class Gate(nn.Module):
...     def forward(self, x):
...         return x if x.sum() > 0 else -x  # data-dependent: fx cannot record this branch
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3), Gate(), nn.ReLU())
>>> from rewrite.facts import facts, shapes
>>> traced = trace(model, torch.randn(1, 3, 16, 16))
>>> traced.leaves  # doctest: +ELLIPSIS
[Leaf(path='1', type_name='Gate', reason='TraceError: symbolically traced variables cannot be used as ...')]
>>> for node in traced.regions[0].graph_module.graph.nodes:
...     print(node.op, repr(facts(node).path), shapes(node))
placeholder '' ((1, 3, 16, 16),)
call_module '0' ((1, 8, 14, 14),)
call_module '1' ((1, 8, 14, 14),)
call_module '2' ((1, 8, 14, 14),)
output '' ((1, 8, 14, 14),)

When the root's own forward is opaque, the modules it calls become the regions:

>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
...         self.head = nn.Conv2d(8, 2, 1)
...     def forward(self, x):
...         x = self.body(x)
...         return self.head(x if x.mean() > 0 else -x)
>>> traced = trace(Net(), torch.randn(1, 3, 16, 16))
>>> [leaf.path for leaf in traced.leaves], [region.path for region in traced.regions]
([''], ['body', 'head'])
>>> [(node.op, facts(node).path) for node in traced.regions[1].graph_module.graph.nodes]
[('placeholder', 'head'), ('call_module', 'head'), ('output', 'head')]
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from rewrite.errors import TraceError, one_line
from rewrite.execution import (
    RunFailed,
    Runner,
    buffer_values_restored,
    meta_empty_like,
    meta_memo,
    model_lock,
    on_meta_else_real,
    real_data_device,
    working_copy,
)
from rewrite.facts import CallId, Frame, facts
from rewrite.paths import join_path
from rewrite.region import (
    ModuleCall,
    Region,
    RegionRun,
    RegionTracer,
    fx_concrete_args,
    held_path,
    one_node_region,
    placeholder_inputs,
)
from rewrite.vocabulary import is_vocabulary_module

__all__ = ["Leaf", "Region", "Traced", "held_path", "trace"]

_USER_REASON = "user"
# fx's own notion of a leaf (torch.nn built-ins except containers); the method only looks at the module.
_FX_DEFAULTS = fx.Tracer()


@dataclass(frozen=True)
class Leaf:
    """A module kept as one opaque ``call_module`` node."""

    path: str  # module path from the model root ("" is the root itself)
    type_name: str  # class name of that module, e.g. "Detect"
    reason: str  # the fx error that made it a leaf, one line ("user" when the caller asked for it)


@dataclass
class Traced:
    """A model cut into traced regions and opaque leaves; see the module docstring for the rules."""

    model: nn.Module
    # The root's graph when the root traced, else one region per traced descendant; and in both cases, one
    # region per module that an opaque module calls directly (breadth-first, each level in execution order).
    regions: list[Region]
    leaves: list[Leaf]  # modules kept as opaque calls, deepest possible, with the reason
    example_inputs: tuple[Any, ...]  # exactly as given (positional args)
    # How often each module path was called while an opaque module ran. Only the first of those calls has a
    # region, so a module called more than once there has calls that no graph shows.
    opaque_calls: dict[str, int] = field(default_factory=dict)


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[str | type[nn.Module]] = (),
    propagate_shapes: bool = True,
) -> Traced:
    """Trace ``model`` on ``example_inputs`` (a tuple of positional args, or one tensor) into regions.

    ``leaf_modules`` names modules to keep opaque, by path (``"model.24"``) or class. With
    ``propagate_shapes=False`` nodes carry no ``tensor_meta``, and the model runs only as far as
    opening opaque modules needs (so bad example inputs may then go unnoticed).

    Raises ``TraceError`` when the example inputs do not run through the model.
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    model = working_copy(model)  # traced and run in place of the user's, which other threads may be running
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    leaf_paths, leaf_types = _split_leaf_modules(model, leaf_modules)
    # What fx cannot trace does not depend on where the runs go: an attempt that fails on meta hands what it
    # learned to the one on real data, which then needs no retries.
    learned: Mapping[str, str] = {}

    def build(runner: Runner) -> Traced:
        nonlocal learned
        session = _Session(model, args, leaf_paths, leaf_types, learned, runner)
        try:
            return session.build(propagate_shapes)
        except RunFailed:
            learned = session.failures
            raise

    try:
        with model_lock(model), buffer_values_restored(model):
            return on_meta_else_real(model, args, build).value
    except RunFailed as failure:
        if failure.on_meta:  # the model or its inputs are on meta: there was nothing real to fall back to
            raise TraceError(
                f"{type(model).__name__} does not run on the example inputs on the meta device:"
                f" {failure.reason} (if an op has no meta kernel, trace on a real device)"
            ) from failure.error
        raise TraceError(
            f"{type(model).__name__} does not run on the example inputs: {failure.reason}"
        ) from failure.error


def mode_dependent_regions(traced: Traced, regions: Iterable[int]) -> dict[int, str]:
    """Which of the given regions trace to other code in the other train/eval mode, each with a one-line why.

    A region's graph fixed every Python-level decision of its forward at the values seen when tracing, among
    them ``self.training`` (a training-only branch, ``F.dropout(x, p, self.training)``). A rewrite of that graph
    would compute the traced mode's code in both modes. The model is traced again in the other mode, on a
    weight-free copy (so the model itself is never switched), or, where the forward needs the values to run, on
    a full copy, and the regions' code compared.
    """
    wanted = list(regions)
    if not wanted:
        return {}
    model = traced.model
    mode, other_mode = ("training", "eval") if model.training else ("eval", "training")
    try:
        other = _traced_in_other_mode(model, traced.example_inputs)
    except TraceError as error:
        return {index: f"it cannot be traced in {other_mode} mode to compare ({error})" for index in wanted}
    twins = {region.path: region for region in other.regions}
    found = {}
    for index in wanted:
        region = traced.regions[index]
        twin = twins.get(region.path)
        if twin is None or twin.graph_module.code != region.graph_module.code:
            where = f"{type(region.graph_module).__name__} at {region.path or '(root)'}"
            found[index] = f"the forward of {where} runs other code in {other_mode} mode than in {mode} mode"
    return found


def _traced_in_other_mode(model: nn.Module, example_inputs: tuple) -> Traced:
    """``model`` traced in the other train/eval mode: on a weight-free copy, or, for a model whose forward needs
    the values to run (it branches on them), on a full copy and the real example inputs."""
    other = copy.deepcopy(model, meta_memo(model)).train(not model.training)
    inputs = pytree.tree_map_only(torch.Tensor, meta_empty_like, example_inputs)
    try:
        return trace(other, inputs, propagate_shapes=False)
    except TraceError:
        if real_data_device(model, example_inputs) is None:
            raise
    return trace(copy.deepcopy(model).train(not model.training), example_inputs, propagate_shapes=False)


class _Session:
    """One attempt at tracing a model, with every run through one runner: all on meta, or all on real data."""

    def __init__(
        self,
        model: nn.Module,
        args: tuple,
        leaf_paths: frozenset[str],
        leaf_types: tuple[type, ...],
        known_failures: Mapping[str, str],
        runner: Runner,
    ) -> None:
        self.model = model
        self.args = args
        self.leaf_paths = leaf_paths
        self.leaf_types = leaf_types
        # path -> reason, for modules whose own forward fx cannot trace: what earlier attempts found, and more
        self.failures = dict(known_failures)
        self.runner = runner
        self.paths = {module: path for path, module in model.named_modules()}  # to name captured calls
        self.calls: Counter[str] = Counter({"": 1})  # the root's call is CallId("", 0)
        self.regions: list[Region] = []
        self.leaves: dict[str, Leaf] = {}
        self.opaque_calls: Counter[str] = Counter()  # calls per path seen while opaque modules ran

    def build(self, propagate_shapes: bool) -> Traced:
        queue = deque(
            [ModuleCall("", self.model, self.args, {}, (Frame(CallId("", 0), type(self.model).__name__),))]
        )
        visited: set[str] = set()
        # The first call of every module below an opened one, in execution order.
        captured: dict[str, ModuleCall] = {}
        while queue:
            call = queue.popleft()
            if call.path in visited:
                continue
            visited.add(call.path)
            for opaque in self.visit(call, propagate_shapes):
                if opaque.path not in captured:  # else an opened ancestor's run already recorded its subtree
                    captured |= self.capture_calls(opaque)
                queue += [child for child in captured.values() if child.stack[-2].path == opaque.path]
        return Traced(
            self.model, self.regions, list(self.leaves.values()), self.args, dict(self.opaque_calls)
        )

    def is_leaf(self, module: nn.Module, path: str) -> bool:
        return (
            path in self.failures
            or self.is_user_leaf(module, path)
            or _FX_DEFAULTS.is_leaf_module(module, path)
            or is_vocabulary_module(module)
        )

    def is_user_leaf(self, module: nn.Module, path: str) -> bool:
        return path in self.leaf_paths or isinstance(module, self.leaf_types)

    def visit(self, call: ModuleCall, propagate_shapes: bool) -> list[ModuleCall]:
        """Trace one call into a region, or find it opaque; return the calls of opaque modules to open.

        The region runs on its inputs when shapes are wanted, or when opaque leaves in it are to be opened
        (the run records their inputs).
        """
        bound = _bind(call.module, call.args, call.kwargs, model=self.model)
        if call.path not in self.failures and self.is_leaf(call.module, call.path):
            region = one_node_region(call, bound)
        else:
            region = self.trace_region(call, bound)
        opened = []
        if region is None:
            self.leaves[call.path] = Leaf(call.path, type(call.module).__name__, self.failures[call.path])
            opened = [call] if _has_children(call.module) else []
            if not call.path:  # the root's own call is the whole model: nothing to match it against
                return opened
            # Its call as one node as well, beside the regions of what it calls: a match of the whole module
            # takes its input and output from this call, not from the pieces fx made of its inside.
            region = one_node_region(call, bound)
        self.regions.append(region)
        to_open = set()
        for node in region.graph_module.graph.nodes:
            path = facts(node).path
            if node.op != "call_module" or path in self.leaves:
                continue
            module = region.graph_module.get_submodule(node.target)
            if path in self.failures:
                self.leaves[path] = Leaf(path, type(module).__name__, self.failures[path])
                if _has_children(module):
                    to_open.add(path)
            elif self.is_user_leaf(module, path):
                self.leaves[path] = Leaf(path, type(module).__name__, _USER_REASON)
        if not (propagate_shapes or to_open):
            return opened
        recorder = RegionRun(region.graph_module, record_shapes=propagate_shapes, keep_calls_of=to_open)
        self.runner.run(recorder, placeholder_inputs(bound))
        return opened + list(recorder.kept_calls.values())

    def trace_region(self, call: ModuleCall, bound: inspect.BoundArguments) -> Region | None:
        """Trace ``call.module``, making failing submodules leaves; None when its own forward fails."""
        concrete_args = fx_concrete_args(bound)
        while call.path not in self.failures:
            tracer = RegionTracer(call, is_leaf=self.is_leaf, calls=self.calls)
            try:
                graph_module = tracer.graph_module(concrete_args, model=self.model)
            except Exception as error:  # noqa: BLE001 - user code may raise anything while fx traces it
                culprit = tracer.raised_in(error)
                # A leaf cannot raise again; should it seem to, blame the region so that the loop ends.
                self.failures[call.path if culprit in self.failures else culprit] = one_line(error)
                continue
            self.calls = tracer.calls
            return Region(call.path, graph_module)
        return None

    def capture_calls(self, opened: ModuleCall) -> dict[str, ModuleCall]:
        """Run an opened module alone; return the first call of every module it calls, at any depth."""
        stack = list(opened.stack[:-1])
        callers: list[nn.Module] = []
        calls: Counter[str] = Counter()
        captured: dict[str, ModuleCall] = {}

        def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if module is opened.module and not callers:
                stack.append(opened.stack[-1])
                callers.append(module)
                return
            held = held_path(callers[-1], module)
            path = join_path(stack[-1].path, held) if held is not None else self.paths[module]
            frame = Frame(CallId(path, calls[path]), type(module).__name__)
            calls[path] += 1
            if path not in captured:
                # Fresh containers: the callee may overwrite items of its input list (YOLO's Detect does).
                args, kwargs = pytree.tree_map(lambda value: value, (args, kwargs))
                captured[path] = ModuleCall(path, module, args, kwargs, (*stack, frame))
            stack.append(frame)
            callers.append(module)

        def after(module: nn.Module, args: tuple, output: Any) -> None:
            stack.pop()
            callers.pop()

        handles = []
        try:
            for module in opened.module.modules():
                handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
                handles.append(module.register_forward_hook(after, always_call=True))
            self.runner.run(opened.module, opened.args, opened.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for path, count in calls.items():
            self.opaque_calls[path] = max(self.opaque_calls[path], count)
        return captured


def _bind(
    module: nn.Module, args: tuple, kwargs: dict[str, Any], *, model: nn.Module
) -> inspect.BoundArguments:
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as error:
        raise TraceError(
            f"{type(model).__name__} does not run on the example inputs:"
            f" {type(module).__name__}.forward {error}"
        ) from error
    bound.apply_defaults()
    return bound


def _split_leaf_modules(
    model: nn.Module, leaf_modules: Iterable[str | type[nn.Module]]
) -> tuple[frozenset[str], tuple[type, ...]]:
    leaf_modules = list(leaf_modules)
    odd = next((spec for spec in leaf_modules if not isinstance(spec, (str, type))), None)
    if odd is not None:  # a module object, say: it would otherwise be ignored without a word
        raise TraceError(
            f"leaf_modules takes module paths (str) or classes, got {type(odd).__name__}"
            + (": pass its path or its class instead" if isinstance(odd, nn.Module) else "")
        )
    paths = {spec for spec in leaf_modules if isinstance(spec, str)}
    types = tuple(spec for spec in leaf_modules if isinstance(spec, type))
    unknown = sorted(paths - {path for path, _ in model.named_modules()})
    if unknown:
        raise TraceError(
            f"leaf_modules names {unknown[0]!r}, which is not a module path of {type(model).__name__}"
        )
    return frozenset(paths), types


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None
