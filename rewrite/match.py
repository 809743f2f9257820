"""Find where a rule set's rules apply in a traced model.

The matcher walks the fx graphs of a :class:`~rewrite.tracer.Traced` model: data flow through each node's
``users`` and ``all_input_nodes``, and module calls through the :class:`~rewrite.facts.NodeFacts` the tracer
wrote on every node. Structure and semantics are kept apart the way networkx's ``GraphMatcher`` keeps them:
the walk only follows data-flow edges and module calls, and every question about *what* a node is goes through
the rule's own callbacks (``ChainStep.accepts`` for op chains, class names for module matches,
``Predicate.check`` for ``where``).

Matching is anchored rather than a general subgraph isomorphism: a chain starts at a node its first step
accepts and can only continue to that node's sole user, so each candidate costs O(chain length) and a whole
model O(nodes × rules). Results are deterministic and non-overlapping: rules are tried in file order, and
within a rule candidates are visited in graph order; a node that an earlier match took is not matched again.

>>> import torch, rewrite
>>> from rewrite.tracer import trace
>>> from rewrite.graph import resolve_stages, resolve_scope
>>> from rewrite.rules import ChainStep, Pattern, Replace, Rule, RuleSet
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
>>> chain = (ChainStep("Conv2d"), ChainStep("BatchNorm2d", optional=True), ChainStep("activation", optional=True))
>>> rules = RuleSet("demo", (Rule("conv", Pattern(chain=chain), Replace("GSConv")),))
>>> traced = trace(net, (torch.zeros(1, 3, 16, 16),))
>>> result = find_matches(traced, rules, resolve_scope(None, traced, resolve_stages(net, traced)))
>>> [(m.rule.name, m.path, m.kind, [node.target for node in m.nodes]) for m in result.matches]
[('conv', '0', <Kind.MODULES: 'modules'>, ['0', '1', '2'])]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch
from torch import fx, nn

from rewrite.calls import STRUCTURAL_OPS, CallIndex, module_at
from rewrite.facts import CallId, dtypes, facts, shapes
from rewrite.graph import Scope
from rewrite.rules import ChainStep, Rule, RuleSet
from rewrite.site import Site
from rewrite.tracer import Traced
from rewrite.vocabulary import (
    CATEGORIES,
    IrreproducibleError,
    carried_activation,
    is_idempotent,
    node_in_category,
    reproduce_activation,
)

__all__ = ["Kind", "Match", "MatchResult", "Occurrence", "Rejection", "find_matches"]


class Kind(StrEnum):
    """How a site is rewritten (see :class:`Match`). Its value is the word reports and JSON show, and a kind
    compares equal to it, so that a plan stays plain data to whoever reads it as a string."""

    MODULE = "module"
    MODULES = "modules"
    GRAPH = "graph"


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

    region: int  # index into Traced.regions of the first node's region
    nodes: tuple[fx.Node, ...]  # in graph order
    input_node: fx.Node  # the node feeding the site (outside it)
    output_node: fx.Node  # the site node whose value leaves the site


@dataclass(frozen=True)
class Match:
    """One site a rule will rewrite.

    ``kind`` says how the rewrite is made, the first that applies:

    * ``Kind.MODULE``: the site is exactly the calls of one module object, so that object is swapped wherever it
      is held (``path`` is the first path it was called through);
    * ``Kind.MODULES``: the site is a chain of module calls written in a larger forward (``act(bn(conv(x)))``),
      each module called only there: the first module is swapped for the new block and the others for
      ``nn.Identity``, so the forward that calls them is kept, with its training branches (``path`` is the first
      module's);
    * ``Kind.GRAPH``: anything else (functional ops, modules called elsewhere too): the site's nodes are replaced
      in the traced region's fx graph, which takes the region module's place (``path`` names the module of the
      site's first op). The trace fixed every Python-level decision of that forward.

    A module (or an inline chain of modules) that the forward calls more than once is one match with
    ``calls`` > 1 when every call matched this rule with the same facts: one new block serves them all, kept
    shared (``repeats`` are the other calls' places, for graph sites). Otherwise each call is a match of its own
    and ``untied`` says which modules lose their sharing, since each call then gets a block of its own.

    The nodes are those of the traced graphs (``Traced.regions``); a rewrite works on copies of them.
    """

    rule: Rule
    path: str
    kind: Kind
    region: int
    nodes: tuple[fx.Node, ...]  # in graph order
    input_node: fx.Node  # the node feeding the site (outside it)
    output_node: fx.Node  # the site node whose value leaves the site
    site: Site
    calls: int = 1  # how many calls of the site's modules the one new block serves
    repeats: tuple[Occurrence, ...] = ()  # for a shared graph site: where its other calls sit
    untied: str = ""  # why the site's modules stop being shared, when they do
    kept_activation: str = ""  # MODULES sites: a trailing shared activation left in place (see _editable)

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
    nodes: tuple[fx.Node, ...]  # every node of the site, for overlap and scope
    covering_call: CallId | None  # the module call the nodes make up exactly, if any
    covering_path: str | None
    # The covering call's own call_module node, when it is one (a leaf's call).
    boundary: fx.Node | None = None

    @property
    def path(self) -> str:
        """Where the candidate is reported: its covering module call, else the module of its first op."""
        return self.covering_path if self.covering_path is not None else facts(self.nodes[0]).path


@dataclass(frozen=True)
class _Found:
    """A candidate that passed its rule's tests, before module identity settles how it is rewritten."""

    candidate: _Candidate
    site: Site
    input_node: fx.Node
    output_node: fx.Node
    region: int

    @property
    def path(self) -> str:
        return self.candidate.path

    @property
    def occurrence(self) -> Occurrence:
        return Occurrence(self.region, self.candidate.nodes, self.input_node, self.output_node)


def find_matches(traced: Traced, rules: RuleSet, scope: Scope) -> MatchResult:
    """Apply ``rules`` in order to the graphs of ``traced`` within ``scope``."""
    calls = CallIndex(traced)
    taken: set[fx.Node] = set()
    result = MatchResult()
    for rule in rules.rules:
        caught = False
        passed: list[_Found] = []
        for candidate in _candidates(calls, rule):
            if taken.intersection(candidate.nodes):
                continue
            if not all(scope.contains(facts(node).path) for node in candidate.nodes):
                continue
            if _inside_excluded(calls, candidate, rule):
                continue
            caught = True
            examined = _examine(calls, candidate, rule)
            if isinstance(examined, Rejection):
                result.rejected.append(examined)
                continue
            taken.update(candidate.nodes)
            passed.append(examined)
        result.matches += _settle_identity(calls, rule, passed)
        if not caught:
            result.unmatched_rules.append(rule.name)
    result.matches.sort(key=lambda m: calls.order[m.nodes[0]])  # graph order, whichever rule won
    return result


def _examine(calls: CallIndex, candidate: _Candidate, rule: Rule) -> _Found | Rejection:
    """The candidate with its site facts when it passes the rule's ``where`` tests, else why not."""
    found = _site(calls, candidate, rule)
    if isinstance(found, Rejection):
        return found
    facts_by_name = found.site.facts()
    reasons = [
        reason
        for reason in (p.check(facts_by_name.get(p.key), found.site.module_type) for p in rule.where)
        if reason
    ]
    hidden = calls.hidden_calls(candidate.nodes)
    if hidden:
        reasons.append(hidden)
    if reasons:
        return Rejection(found.path, rule.name, "; ".join(reasons))
    return found


def _settle_identity(calls: CallIndex, rule: Rule, passed: list[_Found]) -> list[Match]:
    """Group one rule's sites by the module objects they call, so that a rewrite keeps what was shared.

    Sites that call the same stateful modules (a block called in a loop, one conv used twice) become one
    shared match when together they are every call of those modules and they have the same facts; otherwise
    each is rewritten on its own and marked ``untied``.
    """
    groups: dict[frozenset[int], list[_Found]] = {}
    for found in passed:
        groups.setdefault(calls.identity(found.candidate.nodes, _swapped(found.candidate)), []).append(found)
    matches = []
    for identity, members in groups.items():
        all_calls = set().union(*(calls.calls_of_object[key] for key in identity))
        covered = set().union(*(calls.calls_within(found.candidate.nodes) for found in members))
        first = members[0]
        same = all(
            found.site.facts() == first.site.facts() and found.site.counts == first.site.counts
            for found in members
        )
        if all_calls <= covered and same:
            matches.append(_match_serving_all(calls, rule, members))
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
                    Kind.GRAPH,
                    found.region,
                    found.candidate.nodes,
                    found.input_node,
                    found.output_node,
                    found.site,
                    untied=note,
                )
            )
    return matches


def _match_serving_all(calls: CallIndex, rule: Rule, members: list[_Found]) -> Match:
    """One match for sites that are together every call of the modules they call, with the same facts."""
    first = members[0]
    swappable = all(found.candidate.covering_call is not None for found in members) and bool(
        first.candidate.covering_path
    )
    editable, kept = _editable(calls, first) if len(members) == 1 else (False, "")
    kind = Kind.MODULE if swappable else Kind.MODULES if editable else Kind.GRAPH
    # A module edit is named after the module that becomes the new block, even when the chain is the whole of
    # some module's call (an nn.Sequential root, say).
    path = facts(first.candidate.nodes[0]).path if kind is Kind.MODULES else first.path
    return Match(
        rule,
        path,
        kind,
        first.region,
        tuple(node for found in members for node in found.candidate.nodes)
        if swappable
        else first.candidate.nodes,
        first.input_node,
        first.output_node,
        replace(first.site, path=path),
        calls=len(members),
        repeats=() if swappable else tuple(found.occurrence for found in members[1:]),
        kept_activation=kept if kind is Kind.MODULES else "",
    )


def _editable(calls: CallIndex, found: _Found) -> tuple[bool, str]:
    """Whether the site can be rewritten on its modules, keeping the forward that calls them, and the path of a
    trailing activation to keep in place.

    The site must be a chain of module calls, each taking the one before as its only argument, each module
    called here and nowhere else; the first module then becomes the new block and the others ``nn.Identity``.
    One exception: a trailing activation that the forward also calls elsewhere (a ResNet block's one ``relu``)
    stays where it is when applying it twice is applying it once (ReLU, ReLU6, Hardtanh); the new block must then
    end in that activation (checked once it is built).
    """
    previous, kept = found.input_node, ""
    nodes = found.candidate.nodes
    for index, node in enumerate(nodes):
        if node.op != "call_module" or node.kwargs or len(node.args) != 1 or node.args[0] is not previous:
            return False, ""
        node_facts = facts(node)
        shared = len(calls.calls_of_object[calls.object_of_call[node_facts.call]]) != 1
        if shared or calls.opaque_calls.get(node_facts.path, 0) > 1:
            if index == len(nodes) - 1 and index > 0 and is_idempotent(calls.module_of[node]):
                kept = node_facts.path
            else:
                return False, ""
        previous = node
    return True, kept


def _swapped(candidate: _Candidate) -> CallId | None:
    """The module call whose module a rewrite of the candidate swaps (none for the root's own call)."""
    return candidate.covering_call if candidate.covering_path else None


def _candidates(calls: CallIndex, rule: Rule) -> Iterator[_Candidate]:
    if rule.match.module:
        yield from _module_candidates(calls, set(rule.match.module))
    else:
        yield from _chain_candidates(calls, rule)


def _module_candidates(calls: CallIndex, class_names: set[str]) -> Iterator[_Candidate]:
    for call, nodes in calls.nodes_of_call.items():  # insertion order = graph order of each call's first node
        if calls.type_of_call[call] in class_names:
            yield _Candidate(tuple(nodes), call, calls.path_of_call[call], calls.boundary_of_call.get(call))


def _chain_candidates(calls: CallIndex, rule: Rule) -> Iterator[_Candidate]:
    steps = rule.match.chain
    for node in calls.ordered:
        chain = _follow_chain(calls, node, steps)
        if chain:
            yield _covering(calls, tuple(chain))


def _follow_chain(calls: CallIndex, start: fx.Node, steps: tuple[ChainStep, ...]) -> list[fx.Node] | None:
    """The longest node chain from ``start`` that the steps accept, each link being its predecessor's sole user."""
    if not _accepts(calls, start, steps[0]):
        return None
    best: list[fx.Node] | None = None

    def extend(chain: list[fx.Node], step_index: int) -> None:
        nonlocal best
        if step_index == len(steps):
            if best is None or len(chain) > len(best):
                best = list(chain)
            return
        step = steps[step_index]
        users = list(chain[-1].users)
        if len(users) == 1 and _accepts(calls, users[0], step):
            chain.append(users[0])
            extend(chain, step_index + 1)
            chain.pop()
        if step.optional:
            extend(chain, step_index + 1)

    extend([start], 1)
    return best


def _accepts(calls: CallIndex, node: fx.Node, step: ChainStep) -> bool:
    return step.accepts(node.op, node.target, calls.module_of.get(node))


def _covering(calls: CallIndex, nodes: tuple[fx.Node, ...]) -> _Candidate:
    """The outermost module call whose nodes are exactly ``nodes`` (plus structural ones), if there is one."""
    stacks = [facts(node).calls for node in nodes]
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
        if set(calls.computing_nodes(call)) == wanted:
            covering = call
    if covering is None:
        return _Candidate(nodes, None, None)
    return _Candidate(nodes, covering, calls.path_of_call[covering], calls.boundary_of_call.get(covering))


def _inside_excluded(calls: CallIndex, candidate: _Candidate, rule: Rule) -> bool:
    excluded = set(rule.match.not_inside)
    if not excluded:
        return False
    own = set(candidate.nodes)
    return any(
        frame.type_name in excluded and not calls.made_within(frame.call, own)
        for frame in facts(candidate.nodes[0]).frames
    )


def _site(calls: CallIndex, candidate: _Candidate, rule: Rule) -> _Found | Rejection:
    """The facts builders and ``where`` predicates see, or why the candidate cannot be a site."""
    ends = _ends(candidate)
    if isinstance(ends, str):
        return Rejection(candidate.path, rule.name, ends)
    input_node, output_node = ends
    in_shapes, out_shapes = shapes(input_node), shapes(output_node)
    if len(in_shapes) != 1 or len(out_shapes) != 1 or len(in_shapes[0]) < 2 or len(out_shapes[0]) < 2:
        return Rejection(
            candidate.path, rule.name, "the site's input and output are not single (N, C, ...) tensors"
        )
    in_shape, out_shape = in_shapes[0], out_shapes[0]

    modules = list(_modules_under(calls, candidate))
    conv = next((m for m in modules if CATEGORIES["conv"].has_module(m)), None)
    norm = next((m for m in modules if CATEGORIES["norm"].has_module(m)), None)
    try:
        activation = _activation(calls, candidate)
    except IrreproducibleError as error:
        return Rejection(candidate.path, rule.name, f"its activation cannot be reproduced: {error}")

    if candidate.covering_call is not None:
        module_type = calls.type_of_call[candidate.covering_call]
    elif conv is not None:
        module_type = type(conv).__name__
    else:
        module_type = facts(candidate.nodes[0]).type_name
    spatial_stride = 1
    if len(in_shape) > 2 and len(out_shape) > 2 and out_shape[2]:
        spatial_stride = max(1, round(in_shape[2] / out_shape[2]))
    weight = next((p for m in modules for p in m.parameters()), None)
    site = Site(
        path=candidate.path,
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
        counts=dict(Counter(calls.type_of_call[call] for call in calls.calls_within(candidate.nodes))),
        lengths=_lengths(calls, candidate),
        # New blocks go where the replaced weights are; a site without weights follows its input.
        device=weight.device if weight is not None else torch.device("cpu"),
        dtype=weight.dtype if weight is not None else dtypes(input_node)[0],
    )
    return _Found(candidate, site, input_node, output_node, calls.region_of[candidate.nodes[0]])


def _ends(candidate: _Candidate) -> tuple[fx.Node, fx.Node] | str:
    """The site's one input (the node feeding it) and one output (its node read outside it), or why it has
    not one of each."""
    own = set(candidate.nodes)
    # A leaf's call is one node: its input and output are the call's own, whatever regions show its inside.
    boundary = (candidate.boundary,) if candidate.boundary is not None else candidate.nodes
    inputs = []
    for node in boundary:
        for source in node.all_input_nodes:
            if source not in own and source.op not in STRUCTURAL_OPS and source not in inputs:
                inputs.append(source)
    outputs = [node for node in boundary if any(user not in own for user in node.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return f"the site has {len(inputs)} inputs and {len(outputs)} outputs; builders take one of each"
    return inputs[0], outputs[0]


def _lengths(calls: CallIndex, candidate: _Candidate) -> dict[str, int]:
    """For a site that is one module's call: how many modules each of its direct children holds directly."""
    if candidate.covering_call is None:
        return {}
    module = module_at(calls.model, calls.path_of_call[candidate.covering_call])
    return {name: len(child._modules) for name, child in module.named_children()}


def _modules_under(calls: CallIndex, candidate: _Candidate) -> Iterator[nn.Module]:
    for node in candidate.nodes:
        module = calls.module_of.get(node)
        if module is not None:
            yield from module.modules()


def _activation(calls: CallIndex, candidate: _Candidate) -> nn.Module | None:
    """A new module computing the site's last activation (a module, function or tensor method, with its
    arguments, or the activation a norm applies itself), or ``None`` when the site has none.

    An ``nn.Identity`` computes nothing: it is the site's activation only when the site has no other.
    """
    identity = None
    for node in reversed(candidate.nodes):
        module = calls.module_of.get(node)
        if module is not None and CATEGORIES["norm"].has_module(module):
            carried = carried_activation(module)
            if carried is not None:
                return carried
        if node_in_category("activation", node.op, node.target, module):
            if isinstance(module, nn.Identity):
                identity = identity or module
                continue
            return reproduce_activation(node.op, node.target, node.args, node.kwargs, module)
    return identity
