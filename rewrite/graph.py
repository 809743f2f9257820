"""The networkx view of a traced model, and where its stages (backbone / neck / head) and scopes lie.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
...                       nn.Linear(8, 10))
>>> traced = trace(model, torch.randn(1, 3, 32, 32))
>>> graph = to_networkx(traced)
>>> [(key.name, data["module_path"], data["shapes"])
...  for key, data in graph.nodes(data=True) if data["op"] == "call_module"]  # doctest: +NORMALIZE_WHITESPACE
[('_0', '0', ((1, 8, 15, 15),)), ('_1', '1', ((1, 8, 15, 15),)), ('_2', '2', ((1, 8, 1, 1),)),
 ('_3', '3', ((1, 8),)), ('_4', '4', ((1, 10),))]

Stages are resolved in a step of their own, and can label the graph's nodes:

>>> stages = resolve_stages(model, traced)
>>> print(stages.explanation)  # doctest: +NORMALIZE_WHITESPACE
heuristic: head = the last parametric layers (4) and what follows the last spatial feature map;
no upsampling, so no neck; backbone = the rest
>>> label_stages(graph, stages)
>>> [graph.nodes[NodeKey("", name)]["stage"] for name in ("_0", "_2", "_4")]
['backbone', 'head', 'head']
>>> scope = resolve_scope("head", traced, stages)
>>> scope.contains("4"), scope.contains("0")
(True, False)
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import networkx as nx
import torch
from torch import fx, nn

from rewrite.errors import ScopeError, TraceError
from rewrite.facts import CallId, dtypes, facts, shapes
from rewrite.paths import join_path, path_and_ancestors, split_path
from rewrite.tracer import Traced, trace
from rewrite.vocabulary import Role, has_role

__all__ = [
    "STAGES",
    "NodeKey",
    "Scope",
    "StageMap",
    "label_stages",
    "resolve_scope",
    "resolve_stages",
    "to_networkx",
]

STAGES = ("backbone", "neck", "head")


@dataclass(frozen=True)
class StageMap:
    """Which stage each module belongs to, by module-path prefix.

    ``prefixes`` maps a module path (``"model.10"``, ``"backbone.fpn"``) to a stage name; a module belongs to
    the stage of the longest prefix that is itself or one of its ancestors.

    >>> stages = StageMap({"model.0": "backbone", "model.10": "neck"}, source="config", explanation="...")
    >>> stages.stage_of("model.10.conv"), stages.stage_of("model.1"), stages.stage_of("model.0.bn")
    ('neck', None, 'backbone')
    """

    prefixes: dict[str, str] = field(default_factory=dict)
    source: str = "none"
    explanation: str = ""

    def stage_of(self, path: str) -> str | None:
        for probe in path_and_ancestors(path):
            if probe in self.prefixes:
                return self.prefixes[probe]
        return None


# --- the networkx view -------------------------------------------------------------------------------------


class NodeKey(NamedTuple):
    """A graph node's key: the path of the region it was traced in (``""`` for the root) and its fx name."""

    region: str
    name: str

    def __str__(self) -> str:
        return f"{self.region}:{self.name}"


def to_networkx(traced: Traced) -> nx.DiGraph:
    """Every node of every region as one networkx node, keyed by :class:`NodeKey`.

    Attributes are those of ``docs/design.md``; edges follow data flow inside each region. Stages are not
    part of it: :func:`resolve_stages`, then :func:`label_stages` when nodes should carry them.
    """
    graph = nx.DiGraph(model=traced.model, opaque_calls=traced.opaque_calls)
    order = 0
    for index, region in enumerate(traced.regions):
        for node in region.graph_module.graph.nodes:
            node_facts = facts(node)
            graph.add_node(
                NodeKey(region.path, node.name),
                op=node.op,
                target=node.target,
                module_path=node_facts.path,
                module_type=node_facts.type_name,
                module_stack=tuple((frame.path, frame.type_name) for frame in node_facts.frames),
                call_stack=node_facts.calls,
                module=region.graph_module.get_submodule(node.target) if node.op == "call_module" else None,
                shapes=shapes(node),
                dtypes=dtypes(node),
                region=index,
                fx_node=node,
                order=order,
            )
            order += 1
            for source in node.all_input_nodes:
                graph.add_edge(NodeKey(region.path, source.name), NodeKey(region.path, node.name))
    return graph


def label_stages(graph: nx.DiGraph, stages: StageMap) -> None:
    """Give every node of ``graph`` a ``stage`` attribute and the graph a ``stages`` one.

    A node whose module has no stage (typically glue code in the root's forward) takes the stage its inputs
    agree on, or else the one its users agree on.
    """
    graph.graph["stages"] = stages
    for _, data in graph.nodes(data=True):
        data["stage"] = stages.stage_of(data["module_path"])
    keys = sorted(graph, key=lambda key: graph.nodes[key]["order"])
    for neighbours, ordered in ((graph.predecessors, keys), (graph.successors, reversed(keys))):
        for key in ordered:
            data = graph.nodes[key]
            if data["stage"] is None and data["op"] not in ("placeholder", "output"):
                around = {graph.nodes[other]["stage"] for other in neighbours(key)} - {None}
                if len(around) == 1:
                    data["stage"] = around.pop()


# --- stages ------------------------------------------------------------------------------------------------


def resolve_stages(model: nn.Module, traced: Traced | None = None, *, example_inputs: Any = None) -> StageMap:
    """Find the backbone, neck and head of ``model``; the first of these rules that applies wins.

    1. ``"config"``: a module (the model or a submodule) carries a dict ``yaml`` with ``backbone`` and
       ``head`` lists, and holds a ``Sequential`` / ``ModuleList`` of ``len(backbone) + len(head)`` layers
       (the YOLOv5 / ultralytics layout). The backbone list's layers are the backbone, the head list's layers
       the neck, except the last, which is the head.
    2. ``"torchvision-fpn"``: a ``FeaturePyramidNetwork`` is a child of a module named ``backbone``
       (torchvision detectors). The FPN is the neck, the rest of ``backbone`` the backbone, and the backbone's
       siblings (``rpn``, ``roi_heads``, ``head``, ``anchor_generator``) the head; a ``transform`` sibling
       (image resizing and normalisation) gets no stage.
    3. ``"heuristic"``:

       a. Names: when the root has a child named ``backbone`` and one whose name contains ``head``, the
          children named ``backbone``, ``neck`` / ``fpn`` and ``*head*`` give those stages (other children get
          none). This covers detectors whose root forward is opaque, such as torchvision's SSD.
       b. Otherwise, on the root's traced graph with shapes (when ``traced`` is not given, traced here on
          ``example_inputs``, else on a zero 256x256 image batch):

          - head: the last parametric layers, those whose outputs reach the model's outputs without passing
            another parametric layer, plus what they feed, plus everything after the last spatial feature map
            (nodes from which no 4-d tensor with two non-batch dims above 1 is reachable: global pooling,
            flatten, the classifier MLP);
          - neck: from the first upsampling op (``nn.Upsample``, ``F.interpolate``, transposed conv, pixel
            shuffle: one that makes its input larger) back to its lateral layers (the parametric layers
            feeding it through parameter-free ops, widened to the module call holding each: a whole
            Conv-BN-act block), and every non-head node that is not an ancestor of those laterals;
          - backbone: the rest. Without upsampling there is no neck, so a classifier is backbone + head.

          Node stages become module-path prefixes at the shallowest modules whose nodes all agree. The
          example inputs must be large enough that the deepest feature map is larger than 1x1.
    """
    return (
        _stages_from_config(model)
        or _stages_from_fpn(model)
        or _stages_from_graph(model, traced, example_inputs)
    )


def _stages_from_config(model: nn.Module) -> StageMap | None:
    for owner_path, owner in model.named_modules():
        config = getattr(owner, "yaml", None)
        if not (
            isinstance(config, dict)
            and isinstance(config.get("backbone"), list)
            and isinstance(config.get("head"), list)
            and config["head"]
        ):
            continue
        n_backbone, n_layers = len(config["backbone"]), len(config["backbone"]) + len(config["head"])
        for layers_path, layers in owner.named_modules():
            if isinstance(layers, (nn.Sequential, nn.ModuleList)) and len(layers) == n_layers:
                paths = [join_path(owner_path, layers_path, name) for name in layers._modules]
                stages = ["backbone"] * n_backbone + ["neck"] * (n_layers - n_backbone - 1) + ["head"]
                parts = [
                    f"{_span(paths[:n_backbone])} backbone",
                    f"{_span(paths[n_backbone:-1])} neck",
                    f"{paths[-1]} ({type(layers[-1]).__name__}) head",
                ]
                listed = ", ".join(part for part in parts if not part.startswith("none"))
                explanation = (
                    f"config: {owner_path or type(model).__name__}.yaml lists {n_backbone} backbone and"
                    f" {n_layers - n_backbone} head layers: {listed}"
                )
                return StageMap(dict(zip(paths, stages, strict=True)), "config", explanation)
    return None


def _stages_from_fpn(model: nn.Module) -> StageMap | None:
    for backbone_path, backbone in model.named_modules():
        owner_path, name = split_path(backbone_path)
        if name != "backbone":
            continue
        fpn_name = next((name for name, child in backbone.named_children() if _is_fpn(child)), None)
        if fpn_name is None:
            continue
        fpn_path = join_path(backbone_path, fpn_name)
        prefixes = {backbone_path: "backbone", fpn_path: "neck"}
        unstaged = []
        for name, child in model.get_submodule(owner_path).named_children():
            path = join_path(owner_path, name)
            if path == backbone_path:
                continue
            if name == "transform" or type(child).__name__.endswith("Transform"):
                unstaged.append(path)
            else:
                prefixes[path] = "head"
        heads = [path for path, stage in prefixes.items() if stage == "head"]
        explanation = (
            f"torchvision-fpn: {fpn_path} ({type(backbone.get_submodule(fpn_name)).__name__}) neck, rest of"
            f" {backbone_path} backbone, {', '.join(heads) or 'nothing'} head"
            + (f", {', '.join(unstaged)} no stage" if unstaged else "")
        )
        return StageMap(prefixes, "torchvision-fpn", explanation)
    return None


def _is_fpn(module: nn.Module) -> bool:
    # By class name, so that torchvision need not be imported (and look-alike FPNs count too).
    return any(cls.__name__ == "FeaturePyramidNetwork" for cls in type(module).__mro__)


def _stages_from_graph(model: nn.Module, traced: Traced | None, example_inputs: Any) -> StageMap:
    """Rule 3 of :func:`resolve_stages`."""
    named = _stages_from_names(model)
    if named is not None:
        return named
    if traced is None:
        try:
            traced = trace(model, _guess_input(model) if example_inputs is None else example_inputs)
        except (TraceError, ValueError) as error:
            return StageMap(
                {},
                "heuristic",
                f"heuristic: no stages, {type(model).__name__} could not be traced"
                f" on {'its example inputs' if example_inputs is not None else 'a guessed input'} ({error});"
                " pass a traced model",
            )
    root = next((region for region in traced.regions if region.path == ""), None)
    if root is None:
        return StageMap(
            {},
            "heuristic",
            f"heuristic: no stages, the forward of {type(model).__name__} is opaque"
            " and no child is named backbone / head",
        )
    return _classify(root.graph_module)


def _stages_from_names(model: nn.Module) -> StageMap | None:
    children = dict(model.named_children())
    if "backbone" not in children or not any("head" in name for name in children):
        return None
    prefixes = {}
    for name in children:
        if name == "backbone":
            prefixes[name] = "backbone"
        elif name in ("neck", "fpn"):
            prefixes[name] = "neck"
        elif "head" in name:
            prefixes[name] = "head"
    described = ", ".join(f"{path} {stage}" for path, stage in prefixes.items())
    return StageMap(prefixes, "heuristic", f"heuristic: children named by stage: {described}")


def _guess_input(model: nn.Module) -> torch.Tensor:
    """A zero image batch for the first convolution's input channels (or a vector for a first Linear)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        raise ValueError("no Conv2d or Linear layer to guess the input from")
    device = next(model.parameters(), torch.empty(0)).device
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features, device=device)
    return torch.zeros(1, first.in_channels, 256, 256, device=device)


def _classify(graph_module: fx.GraphModule) -> StageMap:
    """Rule 3b of :func:`resolve_stages`, on the root's graph."""
    nodes = [node for node in graph_module.graph.nodes if node.op not in ("placeholder", "output")]
    output = next(node for node in graph_module.graph.nodes if node.op == "output")
    parametric = {node for node in nodes if _is_parametric(node, graph_module)}

    last_layers = _nearest_parametric(output.all_input_nodes, parametric)
    head = last_layers | _reachable(last_layers, downstream=True) | _tail(nodes)
    head.discard(output)

    upsamples = [node for node in nodes if node not in head and _is_upsample(node, graph_module)]
    if upsamples:
        lateral_calls, laterals = _laterals(upsamples[0], parametric, nodes)
        backbone = _reachable(laterals, downstream=False) - laterals - head
        neck_note = (
            f"neck from the first upsampling ({facts(upsamples[0]).path or upsamples[0].name})"
            f" back to its laterals ({_span(lateral_calls)})"
        )
    else:
        backbone = set(nodes) - head
        neck_note = "no upsampling, so no neck"
    # Parameters (get_attr) vote with the ops that use them, not on their own.
    stage_of = {
        node: "head" if node in head else "backbone" if node in backbone else "neck"
        for node in nodes
        if node.op != "get_attr"
    }
    last_names = sorted({facts(node).path or node.name for node in last_layers})
    explanation = (
        f"heuristic: head = the last parametric layers ({_span(last_names)}) and what follows the"
        f" last spatial feature map; {neck_note}; backbone = the rest"
    )
    return StageMap(_prefixes(stage_of), "heuristic", explanation)


def _is_parametric(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return any(True for _ in graph_module.get_submodule(node.target).parameters())
    if node.op in ("call_function", "call_method"):
        return any(
            source.op == "get_attr" and isinstance(_attribute(graph_module, source.target), nn.Parameter)
            for source in node.all_input_nodes
        )
    return False


def _attribute(graph_module: fx.GraphModule, target: str) -> object:
    owner, name = split_path(target)
    return getattr(graph_module.get_submodule(owner), name)


def _is_spatial(node: fx.Node) -> bool:
    """Whether the node outputs a feature map: a 4-d tensor with two non-batch dims above 1 (NCHW or NHWC)."""
    return any(len(shape) == 4 and sum(dim > 1 for dim in shape[1:]) >= 2 for shape in shapes(node))


def _is_upsample(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
    if not has_role(Role.UPSAMPLING, node.op, node.target, module) or not node.all_input_nodes:
        return False
    return _numel(node) > _numel(node.all_input_nodes[0]) > 0


def _numel(node: fx.Node) -> int:
    output_shapes = shapes(node)
    return math.prod(output_shapes[0]) if output_shapes else 0


def _tail(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes after the last feature map: one is among their ancestors, and none among their descendants."""
    reaches_spatial: dict[fx.Node, bool] = {}
    for node in reversed(nodes):
        reaches_spatial[node] = _is_spatial(node) or any(
            reaches_spatial.get(user, False) for user in node.users
        )
    after_spatial: dict[fx.Node, bool] = {}
    for node in nodes:
        after_spatial[node] = any(_is_spatial(s) or after_spatial.get(s, False) for s in node.all_input_nodes)
    return {node for node in nodes if after_spatial[node] and not reaches_spatial[node]}


def _laterals(
    upsample: fx.Node, parametric: set[fx.Node], nodes: list[fx.Node]
) -> tuple[list[str], set[fx.Node]]:
    """The parametric layers feeding ``upsample`` through parameter-free ops, widened to their module calls.

    Returns the paths of those module calls (or of the layers themselves), and the nodes.
    """
    found = _nearest_parametric([upsample], parametric)
    calls = {_enclosing_call(node) for node in found}
    widened = {node for node in nodes if calls & set(facts(node).calls)}
    names = {call.path for call in calls if call is not None} | {
        facts(node).path for node in found if _enclosing_call(node) is None
    }
    return sorted(names), found | widened


def _nearest_parametric(start: Iterable[fx.Node], parametric: set[fx.Node]) -> set[fx.Node]:
    """The parametric nodes met walking back from ``start`` (included) through parameter-free ops only."""
    found, seen, frontier = set(), set(), list(start)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in parametric:
            found.add(node)
        else:
            frontier += node.all_input_nodes
    return found


def _enclosing_call(node: fx.Node) -> CallId | None:
    """The call of the module holding ``node``'s layer (a Conv block for its conv), if not the root's."""
    calls = facts(node).calls
    depth = len(calls) - (2 if node.op == "call_module" else 1)
    return calls[depth] if depth >= 1 else None


def _reachable(start: Iterable[fx.Node], *, downstream: bool) -> set[fx.Node]:
    """The nodes that data flows to from ``start`` (``downstream``), or from which it flows to ``start``."""
    found, frontier = set(), list(start)
    while frontier:
        node = frontier.pop()
        for neighbour in node.users if downstream else node.all_input_nodes:
            if neighbour not in found:
                found.add(neighbour)
                frontier.append(neighbour)
    return found


def _prefixes(stage_of: dict[fx.Node, str]) -> dict[str, str]:
    """Module-path prefixes for node stages: the shallowest modules whose nodes all share one stage."""
    stages_under: dict[str, set[str]] = {}
    for node, stage in stage_of.items():
        for frame in facts(node).frames:
            stages_under.setdefault(frame.path, set()).add(stage)
    prefixes: dict[str, str] = {}
    for path in sorted(stages_under, key=lambda path: (path.count(".") + bool(path), path)):
        stages = stages_under[path]
        # Shallowest first, so that a module inside one with a stage already is covered by that prefix.
        if len(stages) == 1 and not any(probe in prefixes for probe in path_and_ancestors(path)):
            prefixes[path] = next(iter(stages))
    return prefixes


# --- scopes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """The modules a rule may touch: whole stages, subtrees by path, and subtrees whose path matches a glob.

    A module is in scope when its stage is one of ``stages``, or when it or one of its ancestors is one of
    ``paths`` or matches one of ``globs`` (``fnmatch``, so ``*`` also matches dots).
    """

    description: str
    stages: frozenset[str] = frozenset()
    paths: frozenset[str] = frozenset()
    globs: tuple[str, ...] = ()
    stage_map: StageMap = field(default_factory=StageMap)
    everything: bool = False

    def contains(self, path: str) -> bool:
        if self.everything or self.stage_map.stage_of(path) in self.stages:
            return True
        return any(
            probe in self.paths or any(fnmatch.fnmatchcase(probe, glob) for glob in self.globs)
            for probe in path_and_ancestors(path)
        )


def resolve_scope(spec: str | Iterable[str] | None, traced: Traced, stages: StageMap) -> Scope:
    """Resolve a scope spec: ``None`` (everything), a stage name, a module path, a glob, or a list of those.

    A list may be given as a comma-separated string (``"neck,model.24"``). Raises ``ScopeError`` when a part
    of the spec matches no module.
    """
    if spec is None:
        return Scope("the whole model", stage_map=stages, everything=True)
    items = [spec] if isinstance(spec, str) else list(spec)
    terms = [term.strip() for item in items for term in item.split(",") if term.strip()]
    if not terms:
        raise ScopeError(
            f"scope {spec!r} names nothing; give a stage ({', '.join(STAGES)}), a module path or a glob"
        )
    model = traced.model
    module_paths = [path for path, _ in model.named_modules() if path]
    stage_names, paths, globs, described = set(), set(), [], []
    for term in terms:
        if term in STAGES:
            members = [path for path, stage in stages.prefixes.items() if stage == term]
            if not members:
                present = sorted(set(stages.prefixes.values()), key=STAGES.index)
                raise ScopeError(
                    f"scope {term!r} matches no module: {type(model).__name__} has no {term}"
                    f" (stages found: {', '.join(present) or 'none'}; {stages.explanation})"
                )
            stage_names.add(term)
            described.append(f"{term} ({_span(members)})")
        elif term in module_paths:
            paths.add(term)
            described.append(term)
        elif any(char in term for char in "*?["):
            matched = [path for path in module_paths if fnmatch.fnmatchcase(path, term)]
            if not matched:
                raise ScopeError(
                    f"scope {term!r} matches no module path of {type(model).__name__}"
                    + _hint(term, module_paths)
                )
            globs.append(term)
            described.append(f"{term} ({len(matched)} modules)")
        else:
            raise ScopeError(
                f"scope {term!r} matches no module of {type(model).__name__}: not a stage"
                f" ({', '.join(STAGES)}), module path or glob{_hint(term, module_paths)}"
            )
    return Scope(", ".join(described), frozenset(stage_names), frozenset(paths), tuple(globs), stages)


def _hint(term: str, module_paths: list[str]) -> str:
    nearest = difflib.get_close_matches(term, module_paths, n=3)
    return f"; nearest module paths: {', '.join(nearest)}" if nearest else ""


# --- paths -------------------------------------------------------------------------------------------------


def _span(paths: list[str]) -> str:
    """``a``, ``a, b`` or ``a … z (n)``: a short mention of a list of module paths."""
    if len(paths) <= 2:
        return ", ".join(paths) or "none"
    return f"{paths[0]} … {paths[-1]} ({len(paths)})"
