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
[('conv', '', 'graph', 8)]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from rewrite.builders import Site
from rewrite.graph import Scope
from rewrite.rules import ChainStep, Rule, RuleSet, is_activation

__all__ = ["Match", "MatchResult", "Rejection", "find_matches"]

# Nodes that carry no computation of their own; a site may contain or drop them freely.
_STRUCTURAL_OPS = ("get_attr",)

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_FUNCTIONAL_ACTIVATIONS: Mapping[object, type[nn.Module]] = {
    torch.relu: nn.ReLU,
    torch.nn.functional.relu: nn.ReLU,
    torch.nn.functional.relu6: nn.ReLU6,
    torch.nn.functional.silu: nn.SiLU,
    torch.nn.functional.gelu: nn.GELU,
    torch.nn.functional.hardswish: nn.Hardswish,
    torch.nn.functional.mish: nn.Mish,
    torch.sigmoid: nn.Sigmoid,
    torch.tanh: nn.Tanh,
}


@dataclass(frozen=True)
class Rejection:
    """A candidate that a rule's ``match`` caught in scope but that cannot be rewritten: a ``where`` test failed,
    or the site does not have one tensor in and one out."""

    path: str
    rule: str
    reason: str


@dataclass(frozen=True)
class Match:
    """One site a rule will rewrite.

    ``kind`` is ``"module"`` when the site is exactly one module call, so the module object can be swapped in
    its parent (``path`` is that module), and ``"graph"`` when the site's nodes are spread over a forward that
    is not a single module (``path`` names the module of the site's first op; the rewrite happens in the
    traced region's fx graph).
    """

    rule: Rule
    path: str
    kind: str
    region: int
    nodes: tuple[str, ...]  # graph node keys, in graph order
    input_node: str  # the graph node feeding the site (outside it)
    output_node: str  # the site node whose value leaves the site
    site: Site


@dataclass
class MatchResult:
    matches: list[Match] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    unmatched_rules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Candidate:
    nodes: tuple[str, ...]
    covering_call: object | None  # the call id of the module call the nodes make up exactly, if any
    covering_path: str | None


def find_matches(graph: nx.DiGraph, rules: RuleSet, scope: Scope) -> MatchResult:
    """Apply ``rules`` in order to ``graph`` (from :func:`rewrite.graph.to_networkx`) within ``scope``."""
    calls = _CallIndex(graph)
    taken: set[str] = set()
    result = MatchResult()
    for rule in rules.rules:
        found = False
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
            if reasons:
                result.rejected.append(Rejection(path, rule.name, "; ".join(reasons)))
                continue
            taken.update(candidate.nodes)
            kind = "module" if _swappable(calls, candidate) else "graph"
            region = graph.nodes[candidate.nodes[0]]["region"]
            result.matches.append(
                Match(rule, path, kind, region, candidate.nodes, input_node, output_node, site)
            )
        if not found:
            result.unmatched_rules.append(rule.name)
    result.matches.sort(key=lambda m: graph.nodes[m.nodes[0]]["order"])  # graph order, whichever rule won
    return result


class _CallIndex:
    """The graph's nodes in order, and its module calls: which nodes each call made, how often each path was called."""

    def __init__(self, graph: nx.DiGraph) -> None:
        self.ordered: list[str] = sorted(graph.nodes, key=lambda k: graph.nodes[k]["order"])
        self.nodes_of_call: dict[object, list[str]] = {}
        self.path_of_call: dict[object, str] = {}
        self.type_of_call: dict[object, str] = {}
        calls_per_path: dict[str, set[object]] = {}
        for key in self.ordered:
            data = graph.nodes[key]
            if data["op"] in ("placeholder", "output"):
                continue
            for call, (path, type_name) in zip(data["call_stack"], data["module_stack"]):
                self.nodes_of_call.setdefault(call, []).append(key)
                self.path_of_call[call] = path
                self.type_of_call[call] = type_name
                calls_per_path.setdefault(path, set()).add(call)
        self.calls_per_path = {path: len(calls) for path, calls in calls_per_path.items()}
        self.size_of_call = {
            call: sum(graph.nodes[key]["op"] not in _STRUCTURAL_OPS for key in nodes)
            for call, nodes in self.nodes_of_call.items()
        }

    def computing_nodes(self, graph: nx.DiGraph, call: object) -> list[str]:
        return [key for key in self.nodes_of_call[call] if graph.nodes[key]["op"] not in _STRUCTURAL_OPS]


def _candidates(graph: nx.DiGraph, calls: _CallIndex, rule: Rule) -> Iterator[_Candidate]:
    if rule.match.module:
        yield from _module_candidates(calls, set(rule.match.module))
    else:
        yield from _chain_candidates(graph, calls, rule)


def _module_candidates(calls: _CallIndex, class_names: set[str]) -> Iterator[_Candidate]:
    for call, nodes in calls.nodes_of_call.items():  # insertion order = graph order of each call's first node
        if calls.type_of_call[call] in class_names:
            yield _Candidate(tuple(nodes), call, calls.path_of_call[call])


def _chain_candidates(graph: nx.DiGraph, calls: _CallIndex, rule: Rule) -> Iterator[_Candidate]:
    steps = rule.match.chain
    for key in calls.ordered:
        chain = _follow_chain(graph, key, steps)
        if chain:
            yield _covering(graph, calls, tuple(chain))


def _follow_chain(graph: nx.DiGraph, start: str, steps: tuple[ChainStep, ...]) -> list[str] | None:
    """The longest node chain from ``start`` that the steps accept, each link being its predecessor's sole user."""
    if not _accepts(graph, start, steps[0]):
        return None
    best: list[str] | None = None

    def extend(chain: list[str], step_index: int) -> None:
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


def _accepts(graph: nx.DiGraph, key: str, step: ChainStep) -> bool:
    data = graph.nodes[key]
    module = data["module"]
    class_name = type(module).__name__ if module is not None else None
    return step.accepts(data["op"], data["target"], class_name)


def _covering(graph: nx.DiGraph, calls: _CallIndex, nodes: tuple[str, ...]) -> _Candidate:
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
    return _Candidate(nodes, covering, calls.path_of_call[covering])


def _swappable(calls: _CallIndex, candidate: _Candidate) -> bool:
    """A module object can be swapped only when the site is that module's one and only call."""
    if candidate.covering_call is None or not candidate.covering_path:
        return False
    return calls.calls_per_path[candidate.covering_path] == 1


def _inside_excluded(graph: nx.DiGraph, calls: _CallIndex, candidate: _Candidate, rule: Rule) -> bool:
    excluded = set(rule.match.not_inside)
    if not excluded:
        return False
    own = set(candidate.nodes)
    for call, (_, type_name) in zip(
        graph.nodes[candidate.nodes[0]]["call_stack"], graph.nodes[candidate.nodes[0]]["module_stack"]
    ):
        if type_name in excluded and not set(calls.nodes_of_call[call]) <= own:
            return True
    return False


def _site(graph: nx.DiGraph, calls: _CallIndex, candidate: _Candidate, rule: Rule, path: str):
    """The facts builders and ``where`` predicates see, or the reason the candidate cannot be a site."""
    own = set(candidate.nodes)
    inputs = []
    for key in candidate.nodes:
        for source in graph.predecessors(key):
            if (
                source not in own
                and graph.nodes[source]["op"] not in _STRUCTURAL_OPS
                and source not in inputs
            ):
                inputs.append(source)
    outputs = [key for key in candidate.nodes if any(user not in own for user in graph.successors(key))]
    if len(inputs) != 1 or len(outputs) != 1:
        return f"the site has {len(inputs)} inputs and {len(outputs)} outputs; builders take one of each"
    in_shapes, out_shapes = graph.nodes[inputs[0]]["shapes"], graph.nodes[outputs[0]]["shapes"]
    if len(in_shapes) != 1 or len(out_shapes) != 1 or len(in_shapes[0]) < 2 or len(out_shapes[0]) < 2:
        return "the site's input and output are not single (N, C, ...) tensors"
    in_shape, out_shape = tuple(in_shapes[0]), tuple(out_shapes[0])

    modules = list(_modules_under(graph, candidate))
    conv = next((m for m in modules if isinstance(m, _CONV_TYPES)), None)
    norm = next((m for m in modules if isinstance(m, _NORM_TYPES)), None)
    activation = _activation(graph, candidate)

    counts = Counter(
        calls.type_of_call[call]
        for call in {c for key in candidate.nodes for c in graph.nodes[key]["call_stack"]}
        if set(calls.nodes_of_call[call]) <= own
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
        # New blocks go where the replaced weights are; a site without weights follows its input.
        device=weight.device if weight is not None else torch.device("cpu"),
        dtype=weight.dtype if weight is not None else graph.nodes[inputs[0]]["dtypes"][0],
    )
    return site, inputs[0], outputs[0]


def _modules_under(graph: nx.DiGraph, candidate: _Candidate) -> Iterator[nn.Module]:
    for key in candidate.nodes:
        module = graph.nodes[key]["module"]
        if module is not None:
            yield from module.modules()


def _activation(graph: nx.DiGraph, candidate: _Candidate) -> nn.Module | None:
    """The last activation in the site: a module, or a module made for a functional activation."""
    for key in reversed(candidate.nodes):
        data = graph.nodes[key]
        module = data["module"]
        if module is not None and is_activation(module):
            return module
        if data["op"] == "call_function" and data["target"] in _FUNCTIONAL_ACTIVATIONS:
            return _FUNCTIONAL_ACTIVATIONS[data["target"]]()
    return None
