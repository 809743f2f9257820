"""graph.py: the networkx view, stage resolution (config, torchvision FPN, heuristic) and scopes."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torchvision
from models import CatChunkSplit, FailingRoot, SharedBlock, TinyYolo
from torch import nn
from torchvision.models import detection

from rewrite.errors import ScopeError
from rewrite.graph import NodeKey, Scope, StageMap, label_stages, resolve_scope, resolve_stages, to_networkx
from rewrite.tracer import Traced, trace

TINY_YOLO_STAGES = {f"model.{i}": "backbone" for i in range(8)} | {f"model.{i}": "neck" for i in range(8, 15)}
TINY_YOLO_STAGES["model.15"] = "head"
NODE_ATTRIBUTES = {
    "op",
    "target",
    "module_path",
    "module_type",
    "module_stack",
    "call_stack",
    "module",
    "shapes",
    "dtypes",
    "stage",
    "region",
    "fx_node",
    "order",
}


@pytest.fixture(scope="module")
def yolo() -> Traced:
    return trace(TinyYolo().eval(), torch.randn(1, 3, 64, 64))


# --- to_networkx ------------------------------------------------------------------------------------------


def call_of(graph: nx.DiGraph, module_path: str) -> NodeKey:
    """The key of the first ``call_module`` node calling the module at ``module_path``."""
    return next(
        key
        for key, data in graph.nodes(data=True)
        if data["op"] == "call_module" and data["module_path"] == module_path
    )


def test_networkx_view_of_every_region(yolo: Traced) -> None:
    graph = to_networkx(yolo)
    fx_nodes = [(r.path, n) for r in yolo.regions for n in r.graph_module.graph.nodes]
    assert list(graph) == [NodeKey(path, node.name) for path, node in fx_nodes]
    assert all(set(data) == NODE_ATTRIBUTES - {"stage"} for _, data in graph.nodes(data=True))
    label_stages(graph, resolve_stages(yolo.model, yolo))
    assert all(set(data) == NODE_ATTRIBUTES for _, data in graph.nodes(data=True))
    assert [data["order"] for _, data in graph.nodes(data=True)] == list(range(len(fx_nodes)))
    assert isinstance(graph.graph["stages"], StageMap) and graph.graph["stages"].source == "config"
    assert nx.is_directed_acyclic_graph(graph)
    conv_key = call_of(graph, "model.8.conv")
    conv = graph.nodes[conv_key]
    assert conv["op"] == "call_module" and conv["module"] is yolo.model.get_submodule("model.8.conv")
    assert (conv["module_path"], conv["module_type"], conv["stage"], conv["region"]) == (
        "model.8.conv",
        "Conv2d",
        "neck",
        0,
    )
    assert conv["shapes"] == ((1, 32, 4, 4),) and conv_key == ("", conv["fx_node"].name)
    assert set(graph.predecessors(conv_key)) == {call_of(graph, "model.7.cv2.act")}
    detect_key = call_of(graph, "model.15.m.0")
    detect_conv = graph.nodes[detect_key]
    assert (detect_conv["region"], detect_conv["stage"], detect_conv["module_type"]) == (1, "head", "Conv2d")
    assert detect_key.region == "model.15.m.0"
    assert [graph.nodes[key]["op"] for key in graph.predecessors(detect_key)] == ["placeholder"]
    # Edges stay inside regions.
    assert all(graph.nodes[a]["region"] == graph.nodes[b]["region"] for a, b in graph.edges)
    staged = {
        data["stage"] for _, data in graph.nodes(data=True) if data["op"] not in ("placeholder", "output")
    }
    assert staged == {"backbone", "neck", "head"}


def test_glue_code_in_the_root_takes_the_stage_around_it() -> None:
    traced = trace(CatChunkSplit(), torch.randn(1, 3, 8, 8))
    graph = to_networkx(traced)
    label_stages(graph, resolve_stages(traced.model, traced))
    # Everything of CatChunkSplit is root code or a direct child: every compute node gets a stage.
    assert all(
        data["stage"] is not None
        for _, data in graph.nodes(data=True)
        if data["op"] not in ("placeholder", "output")
    )
    cat = next(key for key, data in graph.nodes(data=True) if data["target"] is torch.cat)
    assert graph.nodes[cat]["stage"] == graph.nodes[call_of(graph, "a")]["stage"]


def test_networkx_of_an_opaque_root_and_shared_calls() -> None:
    graph = to_networkx(trace(FailingRoot().eval(), torch.randn(1, 3, 8, 8)))
    assert {data["region"] for _, data in graph.nodes(data=True)} == {0, 1, 2}
    calls = [data["call_stack"][-1] for key, data in graph.nodes(data=True) if data["target"] == "conv"]
    assert [str(call) for call in calls] == ["body.conv@0", "body.conv@1"]
    graph = to_networkx(trace(SharedBlock(), torch.randn(1, 8, 4, 4)))
    assert [data["module"] for key, data in graph.nodes(data=True) if data["target"] == "conv"] == [
        graph.nodes[call_of(graph, "conv")]["module"]
    ] * 2


# --- stages -----------------------------------------------------------------------------------------------


def test_config_stages_from_the_yaml_dict() -> None:
    stages = resolve_stages(TinyYolo())
    assert stages.source == "config" and stages.prefixes == TINY_YOLO_STAGES
    assert stages.explanation == (
        "config: TinyYolo.yaml lists 8 backbone and 8 head layers: model.0 … model.7 (8)"
        " backbone, model.8 … model.14 (7) neck, model.15 (Detect) head"
    )
    assert stages.stage_of("model.11.m.0.cv1.conv") == "neck" and stages.stage_of("") is None


def test_config_on_a_submodule() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.detector = TinyYolo()

    stages = resolve_stages(Wrapper())
    assert stages.prefixes == {f"detector.{path}": stage for path, stage in TINY_YOLO_STAGES.items()}
    assert stages.explanation.startswith("config: detector.yaml lists")


def test_heuristic_finds_the_yolo_stages_without_the_config() -> None:
    model = TinyYolo().eval()
    del model.yaml
    for traced in (None, trace(model, torch.randn(1, 3, 64, 64))):  # traced here on a guessed input, or given
        stages = resolve_stages(model, traced)
        assert stages.source == "heuristic"
        assert stages.prefixes == TINY_YOLO_STAGES
        assert (
            "first upsampling (model.9)" in stages.explanation and "laterals (model.8)" in stages.explanation
        )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", {"conv1": "backbone", "layer4": "backbone", "avgpool": "head", "fc": "head"}),
        ("mobilenet_v3_small", {"features": "backbone", "avgpool": "head", "classifier": "head"}),
        ("convnext_tiny", {"features": "backbone", "avgpool": "head", "classifier": "head"}),
    ],
)
def test_heuristic_on_classifiers_gives_backbone_and_head(name: str, expected: dict[str, str]) -> None:
    stages = resolve_stages(getattr(torchvision.models, name)(weights=None).eval())
    assert expected.items() <= stages.prefixes.items()
    assert set(stages.prefixes.values()) == {"backbone", "head"}
    assert "no upsampling, so no neck" in stages.explanation


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn"])
def test_torchvision_fpn_is_the_neck(name: str) -> None:
    model = getattr(detection, name)(weights=None, weights_backbone=None)
    stages = resolve_stages(model)
    assert stages.source == "torchvision-fpn"
    assert stages.stage_of("backbone.fpn.inner_blocks.0") == "neck"
    assert stages.stage_of("backbone.body.0" if "mobilenet" in name else "backbone.body.layer1") == "backbone"
    assert stages.stage_of("transform") is None
    heads = {"rpn", "roi_heads"} if "rcnn" in name else {"head", "anchor_generator"}
    assert {path for path, stage in stages.prefixes.items() if stage == "head"} == heads
    assert "backbone.fpn (FeaturePyramidNetwork) neck" in stages.explanation


def test_torchvision_detector_graph_has_fpn_convs_in_the_neck() -> None:
    model = detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128
    ).eval()
    traced = trace(model, ([torch.rand(3, 128, 128)],))
    graph = to_networkx(traced)
    label_stages(graph, resolve_stages(model, traced))
    stage_of = {
        data["module_path"]: data["stage"]
        for _, data in graph.nodes(data=True)
        if data["op"] == "call_module"
    }
    assert stage_of["backbone.fpn.layer_blocks.0.0"] == "neck"
    assert stage_of["backbone.body.conv1"] == "backbone"
    assert stage_of["head.classification_head.cls_logits"] == "head"


def test_children_named_backbone_and_head_give_the_stages() -> None:
    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    stages = resolve_stages(model)
    assert (stages.source, stages.prefixes) == ("heuristic", {"backbone": "backbone", "head": "head"})


def test_heuristic_without_a_traceable_root_says_why() -> None:
    stages = resolve_stages(FailingRoot().eval())
    assert stages.prefixes == {} and "opaque" in stages.explanation


# --- scopes -----------------------------------------------------------------------------------------------


def test_scope_specs(yolo: Traced) -> None:
    stages = resolve_stages(yolo.model)
    everything = resolve_scope(None, yolo, stages)
    assert everything.contains("model.3") and everything.contains("")
    neck = resolve_scope("neck", yolo, stages)
    assert neck.contains("model.10") and neck.contains("model.11.cv1.conv") and not neck.contains("model.7")
    assert neck.description == "neck (model.8 … model.14 (7))"
    path = resolve_scope("model.11", yolo, stages)
    assert path.contains("model.11.m.0") and not path.contains("model.1") and not path.contains("model.110")
    glob = resolve_scope("model.1[0-3]*", yolo, stages)
    assert [glob.contains(f"model.{i}") for i in (1, 9, 10, 13, 14)] == [False, False, True, True, False]
    assert glob.contains("model.12.conv")
    for spec in ("head, model.3", ["head", "model.3"]):
        union = resolve_scope(spec, yolo, stages)
        assert (
            union.contains("model.15.m.0") and union.contains("model.3.bn") and not union.contains("model.4")
        )
        assert union.description == "head (model.15), model.3"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nek", r"^scope 'nek' matches no module of TinyYolo: not a stage \(backbone, neck, head\)"),
        ("model.99", r"nearest module paths: model\.9"),
        ("model.9*.x", r"^scope 'model\.9\*\.x' matches no module path of TinyYolo"),
        ("", r"^scope '' names nothing"),
    ],
)
def test_scope_errors_are_one_line_with_suggestions(yolo: Traced, spec: str, message: str) -> None:
    with pytest.raises(ScopeError, match=message) as info:
        resolve_scope(spec, yolo, resolve_stages(yolo.model))
    assert "\n" not in str(info.value)


def test_a_stage_the_model_lacks_is_a_scope_error() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    traced = trace(model, torch.randn(1, 3, 64, 64))
    with pytest.raises(
        ScopeError,
        match=r"^scope 'neck' matches no module: ResNet has no neck \(stages found: backbone, head",
    ):
        resolve_scope("neck", traced, resolve_stages(model, traced))


def test_scope_is_a_plain_value() -> None:
    assert Scope("x", paths=frozenset({"a"})).contains("a.b") and not Scope("x").contains("a")


def test_the_stage_heuristic_traces_on_the_callers_inputs_when_given():
    # A model that only runs on 1-channel 32x32 inputs: the guessed 3-channel image batch cannot trace it.
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 2))
    guessed = resolve_stages(model)
    assert guessed.prefixes == {} and "could not be traced on a guessed input" in guessed.explanation
    given = resolve_stages(model, example_inputs=(torch.zeros(1, 1, 32, 32),))
    assert given.stage_of("0") == "backbone" and given.stage_of("3") == "head"
