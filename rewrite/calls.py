"""The module calls of a traced model, indexed: which nodes each call made, and which module object made it.

The matcher asks it what a candidate site calls (:meth:`CallIndex.calls_within`), which module objects a
rewrite of it must keep shared (:meth:`CallIndex.identity`), and whether an opaque module calls part of it
more often than the graphs show (:meth:`CallIndex.hidden_calls`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx, nn

from rewrite.facts import CallId, facts
from rewrite.tracer import Traced

__all__ = ["STRUCTURAL_OPS", "CallIndex", "module_at"]

# Nodes that carry no computation of their own; a site may contain or drop them freely.
STRUCTURAL_OPS = ("get_attr",)


class CallIndex:
    """The traced graphs' nodes in order, and their module calls: which nodes each call made, which module object
    made it."""

    def __init__(self, traced: Traced) -> None:
        self.model = traced.model
        self.opaque_calls = traced.opaque_calls
        self.ordered: list[fx.Node] = []
        self.region_of: dict[fx.Node, int] = {}
        self.module_of: dict[fx.Node, nn.Module] = {}  # what each call_module node calls
        for index, region in enumerate(traced.regions):
            for node in region.graph_module.graph.nodes:
                self.ordered.append(node)
                self.region_of[node] = index
                if node.op == "call_module":
                    self.module_of[node] = region.graph_module.get_submodule(node.target)
        self.order = {node: position for position, node in enumerate(self.ordered)}
        self.nodes_of_call: dict[CallId, list[fx.Node]] = {}
        self.path_of_call: dict[CallId, str] = {}
        self.type_of_call: dict[CallId, str] = {}
        self.boundary_of_call: dict[CallId, fx.Node] = {}  # a leaf call's own call_module node
        self.object_of_call: dict[CallId, int] = {}  # id() of the module object that made the call
        self.calls_of_object: dict[int, set[CallId]] = {}
        self.path_of_object: dict[int, str] = {}
        self.stateful: set[int] = set()  # objects holding parameters or buffers
        for node in self.ordered:
            if node.op not in ("placeholder", "output"):
                self._add(node)
        self.distinct_nodes_of_call = {call: len(set(nodes)) for call, nodes in self.nodes_of_call.items()}
        self.size_of_call = {
            call: sum(node.op not in STRUCTURAL_OPS for node in nodes)
            for call, nodes in self.nodes_of_call.items()
        }

    def _add(self, node: fx.Node) -> None:
        node_facts = facts(node)
        if node.op == "call_module":
            self.boundary_of_call.setdefault(node_facts.call, node)
        for frame in node_facts.frames:
            self.nodes_of_call.setdefault(frame.call, []).append(node)
            if frame.call in self.path_of_call:
                continue
            self.path_of_call[frame.call] = frame.path
            self.type_of_call[frame.call] = frame.type_name
            module = module_at(self.model, frame.path)
            self.object_of_call[frame.call] = id(module)
            self.calls_of_object.setdefault(id(module), set()).add(frame.call)
            self.path_of_object.setdefault(id(module), frame.path)
            if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
                self.stateful.add(id(module))

    def made_within(self, call: CallId, own: set[fx.Node]) -> bool:
        """Whether every node of ``call`` is in ``own``; the size first, so that a site's enclosing calls (the
        root's: every node) cost nothing to rule out."""
        return self.distinct_nodes_of_call[call] <= len(own) and own.issuperset(self.nodes_of_call[call])

    def computing_nodes(self, call: CallId) -> list[fx.Node]:
        return [node for node in self.nodes_of_call[call] if node.op not in STRUCTURAL_OPS]

    def calls_within(self, nodes: Sequence[fx.Node]) -> set[CallId]:
        """The module calls all of whose nodes are among ``nodes``."""
        own = set(nodes)
        stacks = {call for node in nodes for call in facts(node).calls}
        return {call for call in stacks if self.made_within(call, own)}

    def identity(self, nodes: Sequence[fx.Node], swapped: CallId | None) -> frozenset[int]:
        """The module objects whose sharing a rewrite of ``nodes`` must respect: the stateful ones they call,
        and the module of the ``swapped`` call, if the rewrite swaps one."""
        objects = {self.object_of_call[call] for call in self.calls_within(nodes)}
        identity = {obj for obj in objects if obj in self.stateful}
        if swapped is not None:
            identity.add(self.object_of_call[swapped])
        return frozenset(identity)

    def hidden_calls(self, nodes: Sequence[fx.Node]) -> str | None:
        """Why ``nodes`` cannot be rewritten safely when an opaque module calls one of their modules (or their
        region) more often than the graph shows, else None."""
        paths = {facts(node).path for node in nodes} | {frame.path for frame in facts(nodes[0]).frames}
        repeated = sorted(path for path in paths if self.opaque_calls.get(path, 0) > 1)
        if not repeated:
            return None
        return (
            f"{repeated[0]} is called {self.opaque_calls[repeated[0]]} times by a module fx cannot trace, and only"
            " its first call could be seen; a rewrite would change the others unchecked"
        )


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The module a call path names; a module the model does not hold (made in a forward) stands for itself."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return nn.Module()
