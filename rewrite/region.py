"""One region: a module call traced into an fx graph, and the run of that graph on the call's inputs.

:mod:`rewrite.tracer` decides what the regions of a model are; this module makes and runs one of them. A
:class:`ModuleCall` is the call to trace, with its inputs and call stack. :class:`RegionTracer` traces it
(asking the caller, through ``is_leaf``, which modules stay one node) and writes each node's
:class:`~rewrite.facts.NodeFacts`, naming each module call by the path it was called through
(:func:`held_path`); :func:`one_node_region` makes the graph of a module kept whole. :class:`RegionRun` runs a
region's graph, writing fx's ``tensor_meta`` on its nodes and keeping the first call of the leaves to open.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from rewrite.execution import attributes_restored, model_lock
from rewrite.facts import FACTS_KEY, CallId, Frame, NodeFacts, facts, record_tensor_meta
from rewrite.paths import join_path, relative_path, split_path

__all__ = [
    "ModuleCall",
    "Region",
    "RegionRun",
    "RegionTracer",
    "fx_concrete_args",
    "held_path",
    "one_node_region",
    "placeholder_inputs",
]

# While it traces, fx patches nn.Module.__call__ and __getattr__ for the whole process, and restores them when it
# is done: two traces at once, in two threads, would restore each other's patches. One at a time; and the
# tracer lets other threads' module calls pass by (RegionTracer.call_module, RegionTracer.getattr).
_FX_PATCHES = threading.RLock()
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


@dataclass
class ModuleCall:
    """A module call to trace as a region, with the inputs it was (or will be) called with."""

    path: str
    module: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    stack: tuple[Frame, ...]  # outermost call first, this call last


@dataclass
class Region:
    """One traced graph: ``graph_module`` computes what the module at ``path`` computes.

    It does so for inputs of the structure it was traced with (the same containers, and the same values for
    the non-tensor inputs, which the trace fixed). The graph module shares its submodules with the model by
    reference, and ``call_module`` targets are relative to it; the node's facts (``rewrite.facts.facts``) hold
    the absolute path. In a one-node region (a leaf called by an opaque module) the target is the leaf's own
    attribute name.
    """

    path: str  # module path of the module this graph was traced from ("" = root)
    graph_module: fx.GraphModule


class RegionTracer(fx.Tracer):
    """An fx tracer for one region that tracks module calls: for node metadata and to blame failures.

    ``is_leaf(module, path)`` says which modules stay one ``call_module`` node (``path`` from the model's root);
    ``calls`` counts the calls of each path made so far, from which the calls traced here number on.
    """

    def __init__(
        self, call: ModuleCall, *, is_leaf: Callable[[nn.Module, str], bool], calls: Mapping[str, int]
    ) -> None:
        super().__init__()
        self.module = call.module
        self.region_path = call.path
        self.is_leaf = is_leaf
        self.stack = list(call.stack)
        self.callers = [call.module]  # the module objects of the calls on the stack, from the region's own
        self.calls = Counter(calls)  # the counts after this trace: for the caller to keep when it succeeds
        self._raised_in: dict[int, tuple[BaseException, str]] = {}
        self._calling: tuple[nn.Module, str] | None = None  # the module being called, and its call path
        self.thread = threading.get_ident()

    def graph_module(self, concrete_args: dict[str, Any], *, model: nn.Module) -> fx.GraphModule:
        """The region's module traced with ``concrete_args``, as a graph module; ``model`` (the whole model) is
        locked while fx patches it, and left as it was. Raises whatever the module's code raises."""
        with _FX_PATCHES, model_lock(model), attributes_restored(model), warnings.catch_warnings():
            # fx warns for each fixed input it cannot guard with an assert; fixing them is the point.
            warnings.filterwarnings("ignore", message="Was not able to add assertion")
            graph = self.trace(self.module, concrete_args)
            # Still inside attributes_restored: constants fx parks on the traced module must reach the graph
            # module.
            return fx.GraphModule(self.root, graph, class_name=type(self.module).__name__)

    def raised_in(self, error: BaseException) -> str:
        """Path of the innermost traced-through module whose own code raised ``error`` (else the region)."""
        raised, path = self._raised_in.get(id(error), (None, self.region_path))
        return path if raised is error else self.region_path

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.is_leaf(m, join_path(self.region_path, module_qualified_name))

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:  # fx's patch of nn.Module is global: other threads pass by
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def path_of_module(self, mod: nn.Module) -> str:
        # fx names a module by the first path it was registered under; a call is named by its caller.
        if self._calling is not None and self._calling[0] is mod:
            return self._calling[1]
        return super().path_of_module(mod)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        caller_path = relative_path(self.stack[-1].path, self.region_path)
        held = held_path(self.callers[-1], m)
        qualified_name = join_path(caller_path, held) if held is not None else super().path_of_module(m)
        path = join_path(self.region_path, qualified_name)
        self.stack.append(Frame(CallId(path, self.calls[path]), type(m).__name__))
        self.callers.append(m)
        self.calls[path] += 1
        self._calling = (m, qualified_name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            # The innermost frame sees the error first; a leaf's code never ran, so blame its caller.
            if not self.is_leaf_module(m, qualified_name):
                self._raised_in.setdefault(id(error), (error, path))
            raise
        finally:
            self.stack.pop()
            self.callers.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        _annotate(node, self.stack)
        return node


def held_path(holder: nn.Module, module: nn.Module) -> str | None:
    """The path under which ``holder`` holds ``module``: a direct child's name if it is one, else the first path
    below ``holder`` (a module held in a ``ModuleList`` and called by the list's owner); None when it is not
    held at all.

    A call is credited to this path joined to its caller's: a module shared by many parents (an activation kept
    as a class attribute) is ``model.10.act`` when ``model.10`` calls it, not the path it was first registered
    under.

    >>> act = nn.SiLU()
    >>> block = nn.Module(); block.conv = nn.Conv2d(1, 1, 1); block.act = act
    >>> other = nn.Module(); other.body = nn.ModuleList([nn.Identity(), act])
    >>> held_path(block, act), held_path(other, act), held_path(block, nn.ReLU())
    ('act', 'body.1', None)
    """
    for name, child in holder._modules.items():
        if child is module:
            return name
    for path, descendant in holder.named_modules():
        if descendant is module and path:
            return path
    return None


def _annotate(node: fx.Node, stack: list[Frame] | tuple[Frame, ...]) -> None:
    node.meta[FACTS_KEY] = NodeFacts(tuple(stack))


def one_node_region(call: ModuleCall, bound: inspect.BoundArguments) -> Region:
    """A region whose graph calls a leaf module once: ``output(module(*inputs))``, keeping its defaults."""
    name = split_path(call.path)[1] or "module"
    graph = fx.Graph()
    parameters = bound.signature.parameters
    named = [p for p in parameters.values() if p.kind not in _VARIADIC]
    variadic_values = any(bound.arguments[p.name] for p in parameters.values() if p.kind in _VARIADIC)
    # Generated code cannot give a default to an argument followed by one without; keep the trailing run.
    without_default = [i for i, p in enumerate(named) if p.default is inspect.Parameter.empty]
    first_default = len(named) if variadic_values else without_default[-1] + 1 if without_default else 0
    args, kwargs = [], {}
    for i, parameter in enumerate(named):
        default = parameter.default if i >= first_default else inspect.Parameter.empty
        placeholder = graph.placeholder(parameter.name, default_value=default)
        if parameter.kind == inspect.Parameter.KEYWORD_ONLY:
            kwargs[parameter.name] = placeholder
        else:
            args.append(placeholder)
    # Variadic inputs get one placeholder per value of the recorded call, in the order placeholder_inputs lists
    # them.
    for parameter in parameters.values():
        value = bound.arguments[parameter.name]
        if parameter.kind == inspect.Parameter.VAR_POSITIONAL:
            args += [graph.placeholder(f"{parameter.name}_{i}") for i in range(len(value))]
        elif parameter.kind == inspect.Parameter.VAR_KEYWORD:
            kwargs.update({key: graph.placeholder(key) for key in value})
    graph.output(graph.call_module(name, tuple(args), kwargs))
    for node in graph.nodes:
        _annotate(node, call.stack)
    return Region(
        call.path, fx.GraphModule({name: call.module}, graph, class_name=type(call.module).__name__)
    )


class RegionRun(nn.Module):
    """Runs a region's graph node by node (an fx Interpreter, wrapped as a module for ``functional_call``).

    Writes each node's output shapes and dtypes into its meta when ``record_shapes``, and keeps the first call
    (inputs and call stack) of each leaf whose path is in ``keep_calls_of``, for opening it.
    """

    def __init__(self, graph_module: fx.GraphModule, *, record_shapes: bool, keep_calls_of: set[str]) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.record_shapes = record_shapes
        self.keep_calls_of = keep_calls_of
        self.kept_calls: dict[str, ModuleCall] = {}

    def forward(self, *args: Any) -> Any:
        return _RecordingInterpreter(self).run(*args)


class _RecordingInterpreter(fx.Interpreter):
    def __init__(self, run: RegionRun) -> None:
        super().__init__(run.graph_module)
        self.region_run = run

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict[str, Any]]:
        # fx hands over immutable lists; modules writing into their input list (YOLO's Detect) need lists.
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        args, kwargs = _mutable(args), _mutable(kwargs)
        node_facts, kept = facts(n), self.region_run.kept_calls
        path = node_facts.path
        if n.op == "call_module" and path in self.region_run.keep_calls_of and path not in kept:
            kept[path] = ModuleCall(
                path, self.fetch_attr(n.target), *_mutable((args, kwargs)), node_facts.frames
            )
        return args, kwargs

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if self.region_run.record_shapes:
            record_tensor_meta(n, value)
        return value


def _mutable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        items = [_mutable(item) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {key: _mutable(item) for key, item in value.items()}
    return value


def fx_concrete_args(bound: inspect.BoundArguments) -> dict[str, Any]:
    """fx ``concrete_args``: tensors nested in containers become ``fx.PH``; non-tensor values stay fixed.

    Top-level tensors are left out, so that fx gives their placeholders the parameter's own name.
    """
    concrete = {}
    for name, value in bound.arguments.items():
        if bound.signature.parameters[name].kind in _VARIADIC or isinstance(value, torch.Tensor):
            continue
        concrete[name] = pytree.tree_map_only(torch.Tensor, lambda _: fx.PH, value)
    return concrete


def placeholder_inputs(bound: inspect.BoundArguments) -> list[Any]:
    """The inputs in the order of a region graph's placeholders: named ones, then ``*args``, ``**kwargs``."""
    named, star, double_star = [], [], []
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            star = list(value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            double_star = list(value.values())
        else:
            named.append(value)
    return named + star + double_star
