"""Find where a rule set's rules apply in a traced model.

The matcher walks the networkx view of a :class:`~rewrite.tracer.Traced` model (see :mod:`rewrite.graph`).
Structure and semantics are kept apart the way networkx's ``GraphMatcher`` keeps them: the walk only follows
data-flow edges and module calls, and every question about *what* a node is goes through the rule's own
callbacks (``ChainStep.accepts`` for op chains, class names for module matches, ``Predicate.check`` for
``where``).

Matching is anchored rather than a general subgraph isomorphism: a chain starts at a node its first step
accepts and can only continue to that node's sole user, so each candidate costs O(chain length) and a whole
model O(nodes × rules). Results are deterministic and non-overlapping: rules are tried in file order, and
within a rule candidates are visited in graph order; a node that an earlier match took is not matched again.

>>> import torch, rewrite
>>> from rewrite.tracer import trace
>>> from rewrite.graph import to_networkx, resolve_stages, resolve_scope
>>> from rewrite.rules import parse_rules
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
>>> rules = parse_rules('''
... [ruleset]
... name = "demo"
... [[rule]]
... name = "conv"
... match.chain = ["Conv2d", "BatchNorm2d?", "activation?"]
... where.out_channels = { multiple_of = 2 }
... replace.builder = "GSConv"
... ''')
>>> traced = trace(net, (torch.zeros(1, 3, 16, 16),))
>>> graph = to_networkx(traced)
>>> result = find_matches(graph, rules, resolve_scope(None, traced, resolve_stages(net, traced)))
>>> [(m.rule.name, m.path, m.kind, m.site.out_channels) for m in result.matches]
[('conv', '0', 'modules', 8)]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import networkx as nx
import torch
from torch import fx, nn

from rewrite.graph import NodeKey, Scope
from rewrite.rules import ChainStep, Rule, RuleSet
from rewrite.site import Site
from rewrite.vocabulary import (
    CATEGORIES,
    IrreproducibleError,
    carried_activation,
    is_idempotent,
    node_in_category,
    reproduce_activation,
)

__all__ = ["Match", "MatchResult", "Occurrence", "Rejection", "find_matches"]

# Nodes that carry no computation of their own; a site may contain or drop them freely.
_STRUCTURAL_OPS = ("get_attr",)


@dataclass(frozen=True)
class Rejection:
    """A candidate that a rule's ``match`` caught in scope but that cannot be rewritten: a ``where`` test failed,
    or the site does not have one tensor in and one out."""

    path: str
    rule: str
    reason: str


@dataclass(frozen=True)
class Occurrence:
    """One place in the graph where a site's nodes sit: the nodes, the node feeding them, and their output."""

    region: int
    nodes: tuple[NodeKey, ...]  # graph node keys, in graph order
    input_node: NodeKey  # the graph node feeding the site (outside it)
    output_node: NodeKey  # the site node whose value leaves the site


@dataclass(frozen=True)
class Match:
    """One site a rule will rewrite.

    ``kind`` says how the rewrite is made, the first that applies:

    * ``"module"``: the site is exactly the calls of one module object, so that object is swapped wherever it is
      held (``path`` is the first path it was called through);
    * ``"modules"``: the site is a chain of module calls written in a larger forward (``act(bn(conv(x)))``), each
      module called only there: the first module is swapped for the new block and the others for
      ``nn.Identity``, so the forward that calls them is kept, with its training branches (``path`` is the first
      module's);
    * ``"graph"``: anything else (functional ops, modules called elsewhere too): the site's nodes are replaced in
      the traced region's fx graph, which takes the region module's place (``path`` names the module of the
      site's first op). The trace fixed every Python-level decision of that forward.

    A module (or an inline chain of modules) that the forward calls more than once is one match with
    ``calls`` > 1 when every call matched this rule with the same facts: one new block serves them all, kept
    shared (``repeats`` are the other calls' places, for graph sites). Otherwise each call is a match of its own
    and ``untied`` says which modules lose their sharing, since each call then gets a block of its own.
    """

    rule: Rule
    path: str
    kind: str
    region: int
    nodes: tuple[NodeKey, ...]  # graph node keys, in graph order
    input_node: NodeKey  # the graph node feeding the site (outside it)
    output_node: NodeKey  # the site node whose value leaves the site
    site: Site
    calls: int = 1  # how many calls of the site's modules the one new block serves
    repeats: tuple[Occurrence, ...] = ()  # for a shared graph site: where its other calls sit
    untied: str = ""  # why the site's modules stop being shared, when they do
    kept_activation: str = ""  # "modules" sites: a trailing shared activation left in place (see _editable)

    @property
    def occurrences(self) -> tuple[Occurrence, ...]:
        """Where the site sits: its own place, then each repeat's."""
        return (Occurrence(self.region, self.nodes, self.input_node, self.output_node), *self.repeats)


@dataclass
class MatchResult:
    matches: list[Match] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    unmatched_rules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Candidate:
    nodes: tuple[NodeKey, ...]  # every node of the site, for overlap and scope
    covering_call: object | None  # the call id of the module call the nodes make up exactly, if any
    covering_path: str | None
    # The covering call's own call_module node, when it is one (a leaf's call).
    boundary: NodeKey | None = None


@dataclass(frozen=True)
class _Found:
    """A candidate that passed its rule's tests, before module identity settles how it is rewritten."""

    candidate: _Candidate
    path: str
    site: Site
    input_node: NodeKey
    output_node: NodeKey
    region: int


def find_matches(graph: nx.DiGraph, rules: RuleSet, scope: Scope) -> MatchResult:
    """Apply ``rules`` in order to ``graph`` (from :func:`rewrite.graph.to_networkx`) within ``scope``."""
    calls = _CallIndex(graph)
    taken: set[NodeKey] = set()
    result = MatchResult()
    for rule in rules.rules:
        found = False
        passed: list[_Found] = []
        for candidate in _candidates(graph, calls, rule):
            if taken.intersection(candidate.nodes):
                continue
            path = (
                candidate.covering_path
                if candidate.covering_path is not None
                else graph.nodes[candidate.nodes[0]]["module_path"]
            )
            if not all(scope.contains(graph.nodes[key]["module_path"]) for key in candidate.nodes):
                continue
            if _inside_excluded(graph, calls, candidate, rule):
                continue
            found = True
            site_or_reason = _site(graph, calls, candidate, rule, path)
            if isinstance(site_or_reason, str):
                result.rejected.append(Rejection(path, rule.name, site_or_reason))
                continue
            site, input_node, output_node = site_or_reason
            facts = site.facts()
            reasons = [r for r in (p.check(facts.get(p.key), site.module_type) for p in rule.where) if r]
            hidden = calls.hidden_calls(graph, candidate)
            if hidden:
                reasons.append(hidden)
            if reasons:
                result.rejected.append(Rejection(path, rule.name, "; ".join(reasons)))
                continue
            taken.update(candidate.nodes)
            region = graph.nodes[candidate.nodes[0]]["region"]
            passed.append(_Found(candidate, path, site, input_node, output_node, region))
        result.matches += _settle_identity(graph, calls, rule, passed)
        if not found:
            result.unmatched_rules.append(rule.name)
    result.matches.sort(key=lambda m: graph.nodes[m.nodes[0]]["order"])  # graph order, whichever rule won
    return result


def _settle_identity(graph: nx.DiGraph, calls: _CallIndex, rule: Rule, passed: list[_Found]) -> list[Match]:
    """Group one rule's sites by the module objects they call, so that a rewrite keeps what was shared.

    Sites that call the same stateful modules (a block called in a loop, one conv used twice) become one
    shared match when together they are every call of those modules and they have the same facts; otherwise
    each is rewritten on its own and marked ``untied``.
    """
    groups: dict[frozenset[int], list[_Found]] = {}
    for found in passed:
        groups.setdefault(calls.identity(graph, found.candidate), []).append(found)
    matches = []
    for identity, members in groups.items():
        first = members[0]
        all_calls = set().union(*(calls.calls_of_object[key] for key in identity))
        covered = set().union(*(calls.calls_within(graph, found.candidate) for found in members))
        same = all(
            found.site.facts() == first.site.facts() and found.site.counts == first.site.counts
            for found in members
        )
        if all_calls <= covered and same:
            swappable = all(found.candidate.covering_call is not None for found in members) and bool(
                first.candidate.covering_path
            )
            repeats = (
                ()
                if swappable
                else tuple(
                    Occurrence(f.region, f.candidate.nodes, f.input_node, f.output_node) for f in members[1:]
                )
            )
            nodes = tuple(key for found in members for key in found.candidate.nodes) if swappable else None
            editable, kept = _editable(graph, calls, first) if len(members) == 1 else (False, "")
            kind = "module" if swappable else "modules" if editable else "graph"
            # A module edit is named after the module that becomes the new block, even when the chain is the
            # whole of some module's call (an nn.Sequential root, say).
            path = graph.nodes[first.candidate.nodes[0]]["module_path"] if kind == "modules" else first.path
            matches.append(
                Match(
                    rule,
                    path,
                    kind,
                    first.region,
                    nodes or first.candidate.nodes,
                    first.input_node,
                    first.output_node,
                    replace(first.site, path=path),
                    calls=len(members),
                    repeats=repeats,
                    kept_activation=kept if kind == "modules" else "",
                )
            )
            continue
        shared = sorted(
            f"{calls.path_of_object[key]} called {len(calls.calls_of_object[key])} times"
            for key in identity
            if len(calls.calls_of_object[key]) > 1
        )
        note = f"{', '.join(shared)}; this call gets a block of its own" if shared else ""
        for found in members:
            matches.append(
                Match(
                    rule,
                    found.path,
                    "graph",
                    found.region,
                    found.candidate.nodes,
                    found.input_node,
                    found.output_node,
                    found.site,
                    untied=note,
                )
            )
    return matches


def _editable(graph: nx.DiGraph, calls: _CallIndex, found: _Found) -> tuple[bool, str]:
    """Whether the site can be rewritten on its modules, keeping the forward that calls them, and the path of a
    trailing activation to keep in place.

    The site must be a chain of module calls, each taking the one before as its only argument, each module
    called here and nowhere else; the first module then becomes the new block and the others ``nn.Identity``.
    One exception: a trailing activation that the forward also calls elsewhere (a ResNet block's one ``relu``)
    stays where it is when applying it twice is applying it once (ReLU, ReLU6, Hardtanh); the new block must then
    end in that activation (checked once it is built).
    """
    previous, kept = found.input_node, ""
    keys = found.candidate.nodes
    for index, key in enumerate(keys):
        data = graph.nodes[key]
        node = data["fx_node"]
        if data["op"] != "call_module" or node.kwargs or len(node.args) != 1:
            return False, ""
        if not isinstance(node.args[0], fx.Node) or _key_in_region(key, node.args[0]) != previous:
            return False, ""
        shared = len(calls.calls_of_object[calls.object_of_call[data["call_stack"][-1]]]) != 1
        if shared or calls.opaque_calls.get(data["module_path"], 0) > 1:
            if index == len(keys) - 1 and index > 0 and is_idempotent(data["module"]):
                kept = data["module_path"]
            else:
                return False, ""
        previous = key
    return True, kept


def _key_in_region(key: NodeKey, node: fx.Node) -> NodeKey:
    """The graph key of ``node``, which sits in the region of the node keyed ``key``."""
    return NodeKey(key.region, node.name)


class _CallIndex:
    """The graph's nodes in order, and its module calls: which nodes each call made, which module object made it."""

    def __init__(self, graph: nx.DiGraph) -> None:
        model: nn.Module = graph.graph["model"]
        self.opaque_calls: dict[str, int] = graph.graph.get("opaque_calls", {})
        self.ordered: list[NodeKey] = sorted(graph.nodes, key=lambda k: graph.nodes[k]["order"])
        self.nodes_of_call: dict[object, list[NodeKey]] = {}
        self.path_of_call: dict[object, str] = {}
        self.type_of_call: dict[object, str] = {}
        self.boundary_of_call: dict[object, NodeKey] = {}  # a leaf call's own call_module node
        self.object_of_call: dict[object, int] = {}  # id() of the module object that made the call
        self.calls_of_object: dict[int, set[object]] = {}
        self.path_of_object: dict[int, str] = {}
        self.stateful: set[int] = set()  # objects holding parameters or buffers
        for key in self.ordered:
            data = graph.nodes[key]
            if data["op"] in ("placeholder", "output"):
                continue
            if data["op"] == "call_module":
                self.boundary_of_call.setdefault(data["call_stack"][-1], key)
            for call, (path, type_name) in zip(data["call_stack"], data["module_stack"]):
                self.nodes_of_call.setdefault(call, []).append(key)
                if call in self.path_of_call:
                    continue
                self.path_of_call[call] = path
                self.type_of_call[call] = type_name
                module = _module_at(model, path)
                self.object_of_call[call] = id(module)
                self.calls_of_object.setdefault(id(module), set()).add(call)
                self.path_of_object.setdefault(id(module), path)
                if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
                    self.stateful.add(id(module))
        self.distinct_nodes_of_call = {call: len(set(nodes)) for call, nodes in self.nodes_of_call.items()}
        self.size_of_call = {
            call: sum(graph.nodes[key]["op"] not in _STRUCTURAL_OPS for key in nodes)
            for call, nodes in self.nodes_of_call.items()
        }

    def made_within(self, call: object, own: set[NodeKey]) -> bool:
        """Whether every node of ``call`` is in ``own``; the size first, so that a site's enclosing calls (the
        root's: every node) cost nothing to rule out."""
        return self.distinct_nodes_of_call[call] <= len(own) and own.issuperset(self.nodes_of_call[call])

    def computing_nodes(self, graph: nx.DiGraph, call: object) -> list[NodeKey]:
        return [key for key in self.nodes_of_call[call] if graph.nodes[key]["op"] not in _STRUCTURAL_OPS]

    def calls_within(self, graph: nx.DiGraph, candidate: _Candidate) -> set[object]:
        """The module calls all of whose nodes belong to the candidate."""
        own = set(candidate.nodes)
        stacks = {call for key in candidate.nodes for call in graph.nodes[key]["call_stack"]}
        return {call for call in stacks if self.made_within(call, own)}

    def identity(self, graph: nx.DiGraph, candidate: _Candidate) -> frozenset[int]:
        """The module objects whose sharing a rewrite of the candidate must respect: the stateful ones it calls,
        and the module it swaps."""
        within = self.calls_within(graph, candidate)
        objects = {self.object_of_call[call] for call in within}
        identity = {obj for obj in objects if obj in self.stateful}
        if candidate.covering_call is not None and candidate.covering_path:
            identity.add(self.object_of_call[candidate.covering_call])
        return frozenset(identity)

    def hidden_calls(self, graph: nx.DiGraph, candidate: _Candidate) -> str | None:
        """Why the candidate cannot be rewritten safely when an opaque module calls one of its modules (or
        their region) more often than the graph shows, else None."""
        data = graph.nodes[candidate.nodes[0]]
        paths = {graph.nodes[key]["module_path"] for key in candidate.nodes} | {
            p for p, _ in data["module_stack"]
        }
        repeated = sorted(path for path in paths if self.opaque_calls.get(path, 0) > 1)
        if not repeated:
            return None
        return (
            f"{repeated[0]} is called {self.opaque_calls[repeated[0]]} times by a module fx cannot trace, and only"
            " its first call could be seen; a rewrite would change the others unchecked"
        )


def _module_at(model: nn.Module, path: str) -> nn.Module:
    """The module a call path names; a module the model does not hold (made in a forward) stands for itself."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return nn.Module()


def _candidates(graph: nx.DiGraph, calls: _CallIndex, rule: Rule) -> Iterator[_Candidate]:
    if rule.match.module:
        yield from _module_candidates(calls, set(rule.match.module))
    else:
        yield from _chain_candidates(graph, calls, rule)


def _module_candidates(calls: _CallIndex, class_names: set[str]) -> Iterator[_Candidate]:
    for call, nodes in calls.nodes_of_call.items():  # insertion order = graph order of each call's first node
        if calls.type_of_call[call] in class_names:
            yield _Candidate(tuple(nodes), call, calls.path_of_call[call], calls.boundary_of_call.get(call))


def _chain_candidates(graph: nx.DiGraph, calls: _CallIndex, rule: Rule) -> Iterator[_Candidate]:
    steps = rule.match.chain
    for key in calls.ordered:
        chain = _follow_chain(graph, key, steps)
        if chain:
            yield _covering(graph, calls, tuple(chain))


def _follow_chain(graph: nx.DiGraph, start: NodeKey, steps: tuple[ChainStep, ...]) -> list[NodeKey] | None:
    """The longest node chain from ``start`` that the steps accept, each link being its predecessor's sole user."""
    if not _accepts(graph, start, steps[0]):
        return None
    best: list[NodeKey] | None = None

    def extend(chain: list[NodeKey], step_index: int) -> None:
        nonlocal best
        if step_index == len(steps):
            if best is None or len(chain) > len(best):
                best = list(chain)
            return
        step = steps[step_index]
        users = list(graph.successors(chain[-1]))
        if len(users) == 1 and _accepts(graph, users[0], step):
            chain.append(users[0])
            extend(chain, step_index + 1)
            chain.pop()
        if step.optional:
            extend(chain, step_index + 1)

    extend([start], 1)
    return best


def _accepts(graph: nx.DiGraph, key: NodeKey, step: ChainStep) -> bool:
    data = graph.nodes[key]
    return step.accepts(data["op"], data["target"], data["module"])


def _covering(graph: nx.DiGraph, calls: _CallIndex, nodes: tuple[NodeKey, ...]) -> _Candidate:
    """The outermost module call whose nodes are exactly ``nodes`` (plus structural ones), if there is one."""
    stacks = [graph.nodes[key]["call_stack"] for key in nodes]
    common = []
    for level in zip(*stacks):
        if all(call == level[0] for call in level):
            common.append(level[0])
        else:
            break
    wanted = set(nodes)
    covering = None
    for call in reversed(common):  # innermost first; an enclosing call holds at least its inner call's nodes
        if calls.size_of_call[call] > len(wanted):
            break
        if set(calls.computing_nodes(graph, call)) == wanted:
            covering = call
    if covering is None:
        return _Candidate(nodes, None, None)
    return _Candidate(nodes, covering, calls.path_of_call[covering], calls.boundary_of_call.get(covering))


def _inside_excluded(graph: nx.DiGraph, calls: _CallIndex, candidate: _Candidate, rule: Rule) -> bool:
    excluded = set(rule.match.not_inside)
    if not excluded:
        return False
    own = set(candidate.nodes)
    for call, (_, type_name) in zip(
        graph.nodes[candidate.nodes[0]]["call_stack"], graph.nodes[candidate.nodes[0]]["module_stack"]
    ):
        if type_name in excluded and not calls.made_within(call, own):
            return True
    return False


def _site(graph: nx.DiGraph, calls: _CallIndex, candidate: _Candidate, rule: Rule, path: str):
    """The facts builders and ``where`` predicates see, or the reason the candidate cannot be a site."""
    own = set(candidate.nodes)
    # A leaf's call is one node: its input and output are the call's own, whatever regions show its inside.
    boundary = (candidate.boundary,) if candidate.boundary is not None else candidate.nodes
    inputs = []
    for key in boundary:
        for source in graph.predecessors(key):
            if (
                source not in own
                and graph.nodes[source]["op"] not in _STRUCTURAL_OPS
                and source not in inputs
            ):
                inputs.append(source)
    outputs = [key for key in boundary if any(user not in own for user in graph.successors(key))]
    if len(inputs) != 1 or len(outputs) != 1:
        return f"the site has {len(inputs)} inputs and {len(outputs)} outputs; builders take one of each"
    in_shapes, out_shapes = graph.nodes[inputs[0]]["shapes"], graph.nodes[outputs[0]]["shapes"]
    if len(in_shapes) != 1 or len(out_shapes) != 1 or len(in_shapes[0]) < 2 or len(out_shapes[0]) < 2:
        return "the site's input and output are not single (N, C, ...) tensors"
    in_shape, out_shape = tuple(in_shapes[0]), tuple(out_shapes[0])

    modules = list(_modules_under(graph, candidate))
    conv = next((m for m in modules if CATEGORIES["conv"].has_module(m)), None)
    norm = next((m for m in modules if CATEGORIES["norm"].has_module(m)), None)
    try:
        activation = _activation(graph, candidate)
    except IrreproducibleError as error:
        return f"its activation cannot be reproduced: {error}"

    counts = Counter(
        calls.type_of_call[call]
        for call in {c for key in candidate.nodes for c in graph.nodes[key]["call_stack"]}
        if calls.made_within(call, own)
    )
    if candidate.covering_call is not None:
        module_type = calls.type_of_call[candidate.covering_call]
    elif conv is not None:
        module_type = type(conv).__name__
    else:
        module_type = graph.nodes[candidate.nodes[0]]["module_type"]
    spatial_stride = 1
    if len(in_shape) > 2 and len(out_shape) > 2 and out_shape[2]:
        spatial_stride = max(1, round(in_shape[2] / out_shape[2]))
    weight = next((p for m in modules for p in m.parameters()), None)
    site = Site(
        path=path,
        rule=rule.name,
        module_type=module_type,
        in_channels=in_shape[1],
        out_channels=out_shape[1],
        in_shape=in_shape,
        out_shape=out_shape,
        stride=conv.stride if conv is not None else spatial_stride,
        kernel_size=conv.kernel_size if conv is not None else None,
        groups=conv.groups if conv is not None else None,
        dilation=conv.dilation if conv is not None else None,
        padding=conv.padding if conv is not None else None,
        bias=conv.bias is not None if conv is not None else None,
        activation=activation,
        norm=norm,
        counts=dict(counts),
        lengths=_lengths(graph, calls, candidate),
        # New blocks go where the replaced weights are; a site without weights follows its input.
        device=weight.device if weight is not None else torch.device("cpu"),
        dtype=weight.dtype if weight is not None else graph.nodes[inputs[0]]["dtypes"][0],
    )
    return site, inputs[0], outputs[0]


def _lengths(graph: nx.DiGraph, calls: _CallIndex, candidate: _Candidate) -> dict[str, int]:
    """For a site that is one module's call: how many modules each of its direct children holds directly."""
    if candidate.covering_call is None:
        return {}
    module = _module_at(graph.graph["model"], calls.path_of_call[candidate.covering_call])
    return {name: len(child._modules) for name, child in module.named_children()}


def _modules_under(graph: nx.DiGraph, candidate: _Candidate) -> Iterator[nn.Module]:
    for key in candidate.nodes:
        module = graph.nodes[key]["module"]
        if module is not None:
            yield from module.modules()


def _activation(graph: nx.DiGraph, candidate: _Candidate) -> nn.Module | None:
    """A new module computing the site's last activation (a module, function or tensor method, with its
    arguments, or the activation a norm applies itself), or ``None`` when the site has none.

    An ``nn.Identity`` computes nothing: it is the site's activation only when the site has no other.
    """
    identity = None
    for key in reversed(candidate.nodes):
        data = graph.nodes[key]
        module = data["module"]
        if module is not None and CATEGORIES["norm"].has_module(module):
            carried = carried_activation(module)
            if carried is not None:
                return carried
        if node_in_category("activation", data["op"], data["target"], module):
            if isinstance(module, nn.Identity):
                identity = identity or module
                continue
            node = data["fx_node"]
            return reproduce_activation(data["op"], data["target"], node.args, node.kwargs, module)
    return identity
