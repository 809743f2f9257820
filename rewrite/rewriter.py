"""Carry out matches on a copy of the model, all or nothing.

Two ways to rewrite a site, chosen per traced region:

* **module swap** — the site is exactly one call of one module, so the new block replaces that module object
  in its parent. The user's model class, its methods and the old module's own plain attributes (routing
  indices and the like) carry over, so a forward that routes by them keeps working.
* **graph rewrite** — the site's nodes are part of a larger forward (three attributes called in a user's
  ``forward``, a functional conv). The site's nodes are replaced by one ``call_module`` node in the region's
  ``fx.GraphModule``, and that GraphModule takes the region module's place (for the root region the result
  *is* the GraphModule). A region with any graph rewrite takes all of its sites as graph rewrites, so one
  region never mixes a swapped module tree with a graph that still calls the old modules.

A graph rewrite fixes the code the region traced to in the model's current mode; :func:`refuse_frozen` turns
away the graph sites of regions that run other code in the other train/eval mode, unless the caller allows it.

The user's model is only ever read: everything happens on a deep copy (a weight-free copy on the meta device
when planning), so an error at any step leaves the input untouched.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from rewrite.builders import build
from rewrite.errors import BuildError, one_line
from rewrite.execution import Outcome, RunFailed, meta_memo, run
from rewrite.facts import FACTS_KEY, TENSOR_META_KEY, CallId, Frame, NodeFacts, facts
from rewrite.match import Kind, Match, Occurrence, Rejection
from rewrite.paths import has_attribute, join_path, parent_path, relative_path
from rewrite.site import Site
from rewrite.tracer import Traced, mode_dependent_regions
from rewrite.vocabulary import Role, has_role

__all__ = [
    "BuiltSite",
    "ShapeCheck",
    "absorb_into_graph_regions",
    "build_sites",
    "check_outputs",
    "refuse_frozen",
    "rewrite_model",
    "site_module",
    "site_module_paths",
]


@dataclass(frozen=True)
class BuiltSite:
    """A match, the plain option values its builder got, and the block built (on the device it will live on)."""

    match: Match
    options: dict
    block: nn.Module


@dataclass(frozen=True)
class ShapeCheck:
    """Whether the rewritten model's outputs have the original's structure and shapes."""

    passed: bool
    detail: str


def build_sites(
    model: nn.Module, matches: Sequence[Match], *, device: torch.device | None = None
) -> list[BuiltSite]:
    """Build every match's replacement block in the train/eval mode of what it replaces.

    ``device`` overrides where the blocks are made (meta, when planning without weights).
    """
    built = []
    for match in matches:
        site = match.site if device is None else replace(match.site, device=device)
        options = {name: _resolve(value, site, match) for name, value in match.rule.replace.options.items()}
        block = build(match.rule.replace.builder, site, options)
        block.train(_replaced_module(model, match.path).training)
        if match.kept_activation and not _ends_in(block, type(model.get_submodule(match.kept_activation))):
            # The activation left in place would apply again to what the block gives: rewrite the graph instead.
            match = replace(match, kind=Kind.GRAPH, kept_activation="")
        built.append(BuiltSite(match, options, block))
    return built


def absorb_into_graph_regions(sites: Sequence[BuiltSite]) -> list[BuiltSite]:
    """The sites, with module swaps in a region whose graph is rewritten turned into graph rewrites.

    Such a region's module is replaced by its graph module, which calls leaf modules only: the swap of a module
    the trace went through would not reach it.
    """
    graph_regions = {site.match.region for site in sites if site.match.kind is Kind.GRAPH}
    return [
        replace(site, match=replace(site.match, kind=Kind.GRAPH))
        if site.match.kind is Kind.MODULE and site.match.region in graph_regions and site.match.calls == 1
        else site
        for site in sites
    ]


def _ends_in(block: nn.Module, activation: type[nn.Module]) -> bool:
    """Whether every value ``block`` outputs comes out of an ``activation`` module, through ops that only move
    values (concatenation, slicing, reshapes, transposes)."""
    try:
        graph_module = fx.symbolic_trace(block)
    except Exception:  # noqa: BLE001 -- a block fx cannot trace: nothing can be said about its output
        return False
    [output] = [node for node in graph_module.graph.nodes if node.op == "output"]
    pending, seen = list(output.all_input_nodes), set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            if not isinstance(graph_module.get_submodule(node.target), activation):
                return False
        elif has_role(Role.VALUE_PRESERVING, node.op, node.target):
            # only the tensor argument carries values; indices and sizes do not
            pending += [
                arg
                for arg in node.all_input_nodes
                if arg is node.all_input_nodes[0] or node.target is torch.cat
            ]
        else:
            return False
    return bool(seen)


def refuse_frozen(
    traced: Traced, sites: list[BuiltSite], allow_frozen: bool
) -> tuple[list[BuiltSite], list[Rejection], list[str]]:
    """The sites whose rewrite does not freeze a mode-dependent forward; the others as rejections, or, with
    ``allow_frozen``, kept with a warning that says which code paths were frozen."""
    regions = {
        occurrence.region
        for site in sites
        if site.match.kind is Kind.GRAPH
        for occurrence in site.match.occurrences
    }
    dependent = mode_dependent_regions(traced, sorted(regions))
    kept, rejected, messages = [], [], []
    for site in sites:
        match = site.match
        reasons = [
            dependent[o.region]
            for o in match.occurrences
            if match.kind is Kind.GRAPH and o.region in dependent
        ]
        if not reasons:
            kept.append(site)
        elif allow_frozen:
            mode = "training" if traced.model.training else "eval"
            messages.append(
                f"{match.path}: frozen: {reasons[0]}; the rewritten copy runs its {mode}-mode code in both modes"
            )
            kept.append(site)
        else:
            rejected.append(
                Rejection(
                    match.path,
                    match.rule.name,
                    f"{reasons[0]}, and only a rewrite of its traced graph can express this site, which would fix"
                    " that code for both modes (allow_frozen=True, or --allow-frozen, rewrites it anyway)",
                )
            )
    return kept, rejected, messages


def rewrite_model(
    model: nn.Module, traced: Traced, sites: Sequence[BuiltSite], *, on_meta: bool = False
) -> nn.Module:
    """A copy of ``model`` with every built site in place (weights on meta when ``on_meta``).

    Module sites go first: each new block replaces the old module object under every name that holds it, in the
    copy and in the copies of the traced graphs. Then each region with graph sites has their nodes replaced, and
    its graph module takes the region's place.
    """
    memo = meta_memo(model) if on_meta else {}
    # Only the graphs that graph sites edit are copied (a copy recompiles its code).
    edited = {o.region for built in sites if built.match.kind is Kind.GRAPH for o in built.match.occurrences}
    graph_modules = {index: traced.regions[index].graph_module for index in sorted(edited)}
    new_model, new_graph_modules = copy.deepcopy((model, graph_modules), memo)
    holders = _Holders([new_model, *new_graph_modules.values()])

    graph_sites: dict[int, list[BuiltSite]] = {}
    for built in sites:
        if built.match.kind is Kind.MODULE:
            old = new_model.get_submodule(built.match.path)
            carry_plain_attributes(old, built.block)
            new_model = holders.replace(new_model, old, built.block)
        elif built.match.kind is Kind.MODULES:
            # The forward stays; its calls now reach the block, then Identities.
            paths = site_module_paths(traced, built.match)
            olds = [new_model.get_submodule(path) for path in paths]
            new_model = holders.replace(new_model, olds[0], built.block)
            for path, old in zip(paths[1:], olds[1:], strict=True):
                if path != built.match.kept_activation:
                    new_model = holders.replace(new_model, old, nn.Identity())
        else:
            for occurrence in built.match.occurrences:
                graph_sites.setdefault(occurrence.region, []).append(built)

    for region_index, region_sites in graph_sites.items():
        region_path = traced.regions[region_index].path
        gm = new_graph_modules[region_index]
        # The matches name the traced graph's nodes; the copy's are in the same order.
        copies = dict(zip(graph_modules[region_index].graph.nodes, gm.graph.nodes, strict=True))
        names: dict[int, str] = {}  # one attribute per block, however many places call it
        for built in region_sites:
            for occurrence in built.match.occurrences:
                if occurrence.region == region_index:
                    _replace_nodes(gm, built, occurrence, names, region_path, copies)
                    gm.graph.lint()
        # Only the modules the site nodes called go; the rest of the graph is the user's, dead code included
        # (an op with no users may still update a buffer in place).
        gm.delete_all_unused_submodules()
        gm.recompile()
        old = new_model.get_submodule(region_path) if region_path else new_model
        carry_plain_attributes(old, gm)
        carry_hooks(old, gm)
        new_model = holders.replace(new_model, old, gm)
    return new_model


def site_module(traced: Traced, match: Match) -> nn.Module:
    """What a site computes today, as a module of its own (for measuring it alone)."""
    if match.kind is Kind.MODULE:
        return traced.model.get_submodule(match.path)
    graph = fx.Graph()
    env = {match.input_node: graph.placeholder("x")}
    for node in match.nodes:
        for source in node.all_input_nodes:
            if source not in env and source.op == "get_attr":
                env[source] = graph.node_copy(source)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[match.output_node])
    return fx.GraphModule(traced.regions[match.region].graph_module, graph)


def site_module_paths(traced: Traced, match: Match) -> list[str]:
    """The paths of the modules that a site's nodes call, in order."""
    return [facts(node).path for node in match.nodes]


def _replace_nodes(
    gm: fx.GraphModule,
    built: BuiltSite,
    occurrence: Occurrence,
    names: dict[int, str],
    region_path: str,
    copies: dict[fx.Node, fx.Node],
) -> None:
    """Replace one occurrence's nodes by a call of the site's block, and erase them: those nodes, and the
    ``get_attr`` nodes that only they used.

    ``copies`` maps the traced graph's nodes to ``gm``'s; a site output erased here is mapped to the node that
    stands in for it, for a later site that reads it.
    """
    site_nodes = [copies[node] for node in occurrence.nodes]
    source = copies[occurrence.input_node]
    result = copies[occurrence.output_node]
    if id(built.block) not in names:
        first = site_nodes[0]
        owner = relative_path(facts(first).path, region_path)
        if first.op == "call_module":  # the path is the called module's own: the new one goes beside it
            owner = parent_path(owner)
        names[id(built.block)] = _new_module_name(gm, owner, built.match, len(names))
        gm.add_submodule(names[id(built.block)], built.block)
    with gm.graph.inserting_after(result):
        new_node = gm.graph.call_module(names[id(built.block)], (source,))
    path = join_path(region_path, names[id(built.block)])
    new_node.meta[FACTS_KEY] = _new_node_facts(
        site_nodes, path, built.block, built.match.occurrences.index(occurrence)
    )
    if TENSOR_META_KEY in result.meta:  # what the block computes is what the site computed
        new_node.meta[TENSOR_META_KEY] = result.meta[TENSOR_META_KEY]
    result.replace_all_uses_with(new_node, delete_user_cb=lambda user: user is not new_node)
    copies[occurrence.output_node] = new_node
    inputs = {arg for node in site_nodes for arg in node.all_input_nodes if arg.op == "get_attr"}
    for node in reversed(site_nodes):
        gm.graph.erase_node(node)
    for node in inputs - set(site_nodes):
        if not node.users:
            gm.graph.erase_node(node)


def _new_node_facts(site_nodes: list[fx.Node], path: str, block: nn.Module, number: int) -> NodeFacts:
    """The tracer's facts for the ``number``-th node calling a new block at ``path``: a call of it inside the
    module calls that enclosed every node of the site."""
    enclosing = [facts(node).frames[: -1 if node.op == "call_module" else None] for node in site_nodes]
    shared = min(len(frames) for frames in enclosing)
    shared = next((i for i, frames in enumerate(zip(*enclosing)) if len(set(frames)) > 1), shared)
    return NodeFacts((*enclosing[0][:shared], Frame(CallId(path, number), type(block).__name__)))


def _new_module_name(gm: fx.GraphModule, owner: str, match: Match, number: int) -> str:
    """A free attribute name under ``owner`` for a site's new module, after its rule: ``conv_to_gsconv_0``."""
    stem = re.sub(r"\W", "_", match.rule.name)
    while has_attribute(gm, join_path(owner, f"{stem}_{number}")):
        number += 1
    return join_path(owner, f"{stem}_{number}")


class _Holders:
    """Where each module under some roots is held: every (parent, attribute name) pair, found in one walk and
    kept up to date as modules are replaced, so that a rewrite costs one walk of the model, not one per site.

    >>> inner = nn.ReLU()
    >>> model = nn.Sequential(inner, nn.Sequential(inner))  # one module under two names
    >>> holders = _Holders([model])
    >>> new = nn.SiLU()
    >>> holders.replace(model, inner, new)[1][0]
    SiLU()
    >>> holders.replace(model, new, nn.GELU())[0], model[1][0]  # replaced in turn, under both names
    (GELU(approximate='none'), GELU(approximate='none'))
    """

    def __init__(self, roots: list[nn.Module]) -> None:
        # module id -> (parent id, name) -> parent
        self._held: dict[int, dict[tuple[int, str], nn.Module]] = {}
        for root in roots:
            self._add_subtree(root)

    def _add_subtree(self, top: nn.Module) -> None:
        for module in top.modules():
            for name, child in module._modules.items():
                if child is not None:
                    self._held.setdefault(id(child), {})[(id(module), name)] = module

    def replace(self, root: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
        """Put ``new`` wherever a module holds ``old``; return ``root`` (``new`` if ``root`` was ``old``), so
        that every name of an aliased module runs the new one."""
        places = self._held.setdefault(id(new), {})
        for place, parent in self._held.pop(id(old), {}).items():
            # A graph rewrite deletes the submodules it no longer calls: those places hold nothing now.
            if parent._modules.get(place[1]) is old:
                parent._modules[place[1]] = new
                places[place] = parent  # where a later site finds it, should it replace it in turn
        self._add_subtree(new)
        return new if root is old else root


# nn.Module's hook tables: a graph module that takes a module's place runs the hooks the user put on it.
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new``, taking ``old``'s place, runs the hooks the user put on ``old``."""
    tables = [table for table in _HOOK_TABLES if getattr(old, table, None)]
    for table in tables:
        getattr(new, table).update(getattr(old, table))
    _kept_by_deepcopy(new, tables)


def carry_plain_attributes(old: nn.Module, new: nn.Module) -> None:
    """``new``, taking ``old``'s place, gets ``old``'s own plain attributes (a model's ``stride``, a layer's
    routing ``i``, ``f`` and ``type``), which code that still runs as written may read; not its submodules, nor
    ``nn.Module``'s internals, nor a name ``new`` already has or its class defines as a property (a graph
    module's ``code``). Like ``old``'s, they may shadow a method (YOLOv5's ``type`` shadows ``Module.type``)."""
    names = [
        name
        for name, value in vars(old).items()
        if not (name.startswith("_") or name == "training" or name in vars(new))
        and not inspect.isdatadescriptor(inspect.getattr_static(type(new), name, None))
        and not isinstance(value, nn.Module)
    ]
    for name in names:
        setattr(new, name, getattr(old, name))
    _kept_by_deepcopy(new, names)


def _kept_by_deepcopy(module: nn.Module, names: list[str]) -> None:
    """A graph module's deep copy is rebuilt from its graph: it keeps only the attributes its ``meta`` lists as
    preserved (torch.ao's quantize_fx keeps a model's attributes the same way). Copies are common: an EMA of
    the weights, a trainer's checkpoint."""
    if names and isinstance(module, fx.GraphModule):
        preserved = module.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})
        preserved.update({name: getattr(module, name) for name in names})


def _resolve(value, site: Site, match: Match):
    """Turn a rule option's derivation (``{count = ...}`` / ``{fact = ...}``) into its value for this site."""
    derive = getattr(value, "derive", None)
    if derive is None:
        return value
    try:
        return derive(site)
    except (KeyError, ValueError) as error:
        raise BuildError(f"{match.path}: rule '{match.rule.name}': {error}") from None


def _replaced_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:  # a graph site named after an op in a forward, not after a module
        return model


def check_outputs(
    original: nn.Module,
    rewritten: nn.Module,
    example_inputs: tuple,
    *,
    other_mode: bool = True,
    outcomes: tuple[Outcome, Outcome] | None = None,
) -> ShapeCheck:
    """Run both models on the example inputs and compare output structure and shapes, in the models' own
    train/eval mode and, with ``other_mode``, then in the other one. ``outcomes``: the two models' runs in
    their own mode, when the caller made them already (the planner's profiles).

    The other mode runs on weight-free copies (the models themselves stay in their mode), and only when the
    original runs in that mode on these inputs (a torchvision detector in training mode wants targets too).
    The planner asks for it when a site keeps or traces the user's own forward code (``modules`` and
    ``graph`` sites): a module swap leaves none of it.

    Sizes that depend on the data (detections left after NMS) cannot be compared between two models with
    different weights; when the original needs real data to run, a tensor's leading size is left out.
    """
    mode, other = ("training", "eval") if original.training else ("eval", "training")
    check = _compare(original, rewritten, example_inputs, outcomes)
    if not check.passed or not other_mode:
        return check
    original_copy = copy.deepcopy(original, meta_memo(original)).train(not original.training)
    try:
        _outputs(original_copy, example_inputs)
    except Exception:  # noqa: BLE001 -- the model does not run in the other mode on these inputs: nothing to check
        return ShapeCheck(True, f"{check.detail}, in {mode} mode")
    rewritten_copy = copy.deepcopy(rewritten, meta_memo(rewritten)).train(not original.training)
    try:
        check_other = _compare(original_copy, rewritten_copy, example_inputs)
    except Exception as error:  # noqa: BLE001 -- said in the detail: these inputs may not suit that mode
        # e.g. a new BatchNorm in training mode on a batch of one 1x1 map: the inputs, not the rewrite
        return ShapeCheck(
            True,
            f"{check.detail}, in {mode} mode; in {other} mode the copy fails on these inputs: {one_line(error)}",
        )
    if not check_other.passed:
        return ShapeCheck(False, f"in {other} mode: {check_other.detail}")
    return ShapeCheck(True, f"{check.detail}, in {mode} and {other} mode")


def _compare(
    original: nn.Module,
    rewritten: nn.Module,
    example_inputs: tuple,
    outcomes: tuple[Outcome, Outcome] | None = None,
) -> ShapeCheck:
    before, data_dependent = _outputs(original, example_inputs) if outcomes is None else _values(outcomes[0])
    after, _ = _outputs(rewritten, example_inputs) if outcomes is None else _values(outcomes[1])
    before_leaves, before_spec = torch.utils._pytree.tree_flatten(before)
    after_leaves, after_spec = torch.utils._pytree.tree_flatten(after)
    if before_spec != after_spec:
        return ShapeCheck(False, f"output structure changed: {before_spec} became {after_spec}")
    for index, (old, new) in enumerate(zip(before_leaves, after_leaves)):
        if not isinstance(old, torch.Tensor):
            continue
        old_shape, new_shape = tuple(old.shape), tuple(new.shape)
        if data_dependent:
            old_shape, new_shape = (len(old_shape), *old_shape[1:]), (len(new_shape), *new_shape[1:])
        if old_shape != new_shape:
            return ShapeCheck(False, f"output {index} has shape {tuple(new.shape)}, was {tuple(old.shape)}")
    compared = "structure, ranks and trailing sizes" if data_dependent else "structure and shapes"
    return ShapeCheck(True, f"{len(before_leaves)} output(s): {compared} unchanged")


def _outputs(model: nn.Module, example_inputs: tuple) -> tuple[object, bool]:
    """The model's outputs — on meta stand-ins when it runs there — and whether it needed real data."""
    try:
        outcome = run(model, example_inputs)
    except RunFailed as failure:
        raise failure.error  # the model's own error, as calling the model would raise it
    return _values(outcome)


def _values(outcome: Outcome) -> tuple[object, bool]:
    return outcome.value, outcome.meta_failure is not None
