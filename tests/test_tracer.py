"""trace(): the hard cases one by one, TinyYolo, torchvision classifiers and detectors; no side effects."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from models import (
    C3,
    YOLOV5L,
    CatChunkSplit,
    DictListIO,
    FailingRoot,
    FunctionalConv,
    GatedNet,
    NestedFailing,
    Routed,
    SharedBlock,
    TinyYolo,
)
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils import _pytree as pytree
from torchvision.models import detection

from rewrite.errors import TraceError
from rewrite.facts import TENSOR_META_KEY, CallId, Frame, NodeFacts, dtypes, facts, shapes
from rewrite.tracer import Traced, trace


def nodes(traced: Traced, region: str = "") -> list[fx.Node]:
    return list(next(r for r in traced.regions if r.path == region).graph_module.graph.nodes)


def called_modules(traced: Traced) -> set[str]:
    return {
        facts(n).path for r in traced.regions for n in r.graph_module.graph.nodes if n.op == "call_module"
    }


def assert_same_outputs(actual: object, expected: object) -> None:
    actual_leaves, expected_leaves = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
    assert len(actual_leaves) == len(expected_leaves)
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        torch.testing.assert_close(a, e)


def module_stack(node: fx.Node) -> tuple[tuple[str, str], ...]:
    return tuple((frame.path, frame.type_name) for frame in facts(node).frames)


def assert_well_formed(traced: Traced) -> None:
    """The node facts of docs/design.md, on every node of every region."""
    model_paths = dict(traced.model.named_modules())
    for region in traced.regions:
        for node in region.graph_module.graph.nodes:
            node_facts = facts(node)
            assert isinstance(node_facts, NodeFacts), (region.path, node.name)
            assert module_stack(node)[0] == ("", type(traced.model).__name__)
            assert type(model_paths[node_facts.path]).__name__ == node_facts.type_name
            assert len(shapes(node)) == len(dtypes(node))
            if node.op == "call_module":  # the absolute path names the very module the node calls
                assert model_paths[node_facts.path] is region.graph_module.get_submodule(node.target)


# --- the hard cases ----------------------------------------------------------------------------------------


def test_data_dependent_if_and_tensor_loop_become_leaves() -> None:
    model, x = GatedNet().eval(), torch.randn(2, 3, 8, 8)
    traced = trace(model, x)
    assert [(leaf.path, leaf.type_name) for leaf in traced.leaves] == [
        ("gate", "DataDependentGate"),
        ("loop", "RowLoop"),
    ]
    assert "control flow" in traced.leaves[0].reason and "models.py" in traced.leaves[0].reason
    assert "cannot be iterated" in traced.leaves[1].reason
    assert all("\n" not in leaf.reason for leaf in traced.leaves)
    assert [r.path for r in traced.regions] == [""]
    assert called_modules(traced) == {"stem", "gate", "loop", "out"}
    assert_same_outputs(traced.regions[0].graph_module(x), model(x))
    assert_well_formed(traced)
    assert shapes(nodes(traced)[-1]) == ((2, 4, 8, 8),)


def test_dict_and_list_inputs_and_outputs() -> None:
    model = DictListIO()
    inputs = {"rgb": torch.randn(2, 3, 8, 8), "depth": torch.randn(2, 1, 8, 8)}
    extras = [torch.randn(2, 8, 8, 8), torch.randn(1, 8, 1, 1)]
    traced = trace(model, (inputs, extras))
    assert traced.leaves == []
    assert traced.example_inputs[0] is inputs and traced.example_inputs[1] is extras
    placeholders = [n for n in nodes(traced) if n.op == "placeholder"]
    assert [shapes(n) for n in placeholders] == [
        ((2, 3, 8, 8),),
        ((2, 1, 8, 8),),
        ((2, 8, 8, 8),),
        ((1, 8, 1, 1),),
    ]
    assert shapes(nodes(traced)[-1]) == ((2, 8, 8, 8),) * 3  # "fused" and both "parts", flattened
    out = traced.regions[0].graph_module(inputs, extras)
    assert set(out) == {"fused", "parts"} and len(out["parts"]) == 2
    assert_same_outputs(out, model(inputs, extras))
    assert_well_formed(traced)


def test_shared_module_calls_are_told_apart() -> None:
    traced = trace(SharedBlock(), torch.randn(1, 8, 4, 4))
    convs = [n for n in nodes(traced) if n.op == "call_module" and n.target == "conv"]
    assert [facts(n).path for n in convs] == ["conv", "conv"]
    assert [str(facts(n).call) for n in convs] == ["conv@0", "conv@1"]
    assert_well_formed(traced)


def test_functional_conv_is_attributed_to_its_module() -> None:
    model, x = nn.Sequential(FunctionalConv(), nn.ReLU()), torch.randn(2, 3, 8, 8)
    traced = trace(model, x)
    conv = next(n for n in nodes(traced) if n.op == "call_function" and n.target is torch.conv2d)
    assert (facts(conv).path, facts(conv).type_name) == ("0", "FunctionalConv")
    assert shapes(conv) == ((2, 8, 8, 8),) and dtypes(conv) == (torch.float32,)
    weight = next(n for n in nodes(traced) if n.op == "get_attr" and n.target == "0.weight")
    assert facts(weight).path == "0" and shapes(weight) == ((8, 3, 3, 3),)
    assert_same_outputs(traced.regions[0].graph_module(x), model(x))


def test_cat_chunk_and_split_shapes() -> None:
    model, x = CatChunkSplit(), torch.randn(2, 3, 8, 8)
    traced = trace(model, x)
    # By what each node calls, in the forward's order, not by the names fx happens to give them.
    cat = next(n for n in nodes(traced) if n.target is torch.cat)
    chunk = next(n for n in nodes(traced) if n.op == "call_method" and n.target == "chunk")
    split = next(n for n in nodes(traced) if n.target in (torch.split, torch.functional.split))
    assert shapes(cat) == ((2, 16, 8, 8),)
    assert shapes(chunk) == ((2, 8, 8, 8),) * 2
    assert shapes(split) == ((2, 4, 8, 8),) * 3
    assert facts(cat).path == ""  # ops written in the root's forward
    assert_same_outputs(traced.regions[0].graph_module(x), model(x))
    assert_well_formed(traced)


def test_layers_routed_by_index_attributes() -> None:
    model, x = Routed(), torch.randn(2, 3, 8, 8)
    traced = trace(model, x)
    assert traced.leaves == []
    cat = next(n for n in nodes(traced) if n.target is torch.cat)
    assert facts(cat).path == "layers.2" and shapes(cat) == ((2, 16, 8, 8),)
    assert [facts(s).path for s in cat.args[0]] == ["layers.1", "layers.0"]  # [x, y[0]]
    assert_same_outputs(traced.regions[0].graph_module(x), model(x))


def test_failing_root_traces_its_children_as_regions() -> None:
    model, x = FailingRoot().eval(), torch.randn(2, 3, 8, 8)
    traced = trace(model, x)
    assert [(leaf.path, leaf.type_name) for leaf in traced.leaves] == [("", "FailingRoot")]
    assert "control flow" in traced.leaves[0].reason
    assert [r.path for r in traced.regions] == ["stem", "body", "head"]  # `unused` is never called
    stem = nodes(traced, "stem")
    assert [facts(n).path for n in stem if n.op == "call_module"] == ["stem.0", "stem.1", "stem.2"]
    assert module_stack(stem[1]) == (("", "FailingRoot"), ("stem", "Sequential"), ("stem.0", "Conv2d"))
    assert facts(stem[1]).calls == (CallId("", 0), CallId("stem", 0), CallId("stem.0", 0))
    convs = [facts(n).call for n in nodes(traced, "body") if n.op == "call_module" and n.target == "conv"]
    assert convs == [CallId("body.conv", 0), CallId("body.conv", 1)]
    head = nodes(traced, "head")  # a leaf called by an opaque module: a one-node region
    assert [n.op for n in head] == ["placeholder", "call_module", "output"]
    assert shapes(head[1]) == ((2, 2, 8, 8),)
    assert_same_outputs(
        traced.regions[2].graph_module(torch.ones(1, 8, 4, 4)), model.head(torch.ones(1, 8, 4, 4))
    )
    assert_well_formed(traced)


def test_the_innermost_failing_module_becomes_the_leaf() -> None:
    model, x = NestedFailing().eval(), torch.randn(2, 3, 8, 8)
    traced = trace(model, x)
    assert [leaf.path for leaf in traced.leaves] == ["block.inner.gate"]
    assert called_modules(traced) == {"stem", "block.inner.conv", "block.inner.gate", "block.conv"}
    gate = next(n for n in nodes(traced) if n.target == "block.inner.gate")
    assert module_stack(gate)[1:] == (
        ("block", "Outer"),
        ("block.inner", "Inner"),
        ("block.inner.gate", "DataDependentGate"),
    )
    assert_same_outputs(traced.regions[0].graph_module(x), model(x))


def test_user_leaves_by_path_and_class_are_not_opened() -> None:
    model = TinyYolo().eval()
    traced = trace(model, torch.randn(1, 3, 64, 64), leaf_modules=("model.0", C3))
    user = [leaf.path for leaf in traced.leaves if leaf.reason == "user"]
    assert user == ["model.0", "model.2", "model.4", "model.6", "model.11", "model.14"]
    assert not any(path.startswith("model.2.") for path in called_modules(traced))
    by_class = trace(model, torch.randn(1, 3, 64, 64), leaf_modules=C3)  # a lone class needs no tuple
    assert [leaf.path for leaf in by_class.leaves if leaf.reason == "user"] == user[1:]
    with pytest.raises(TraceError, match=r"leaf_modules names 'model\.99'.*TinyYolo"):
        trace(model, torch.randn(1, 3, 64, 64), leaf_modules=("model.99",))


def test_a_module_object_as_leaf_module_is_an_error_not_ignored() -> None:
    model = TinyYolo().eval()
    with pytest.raises(
        TraceError, match=r"leaf_modules takes module paths \(str\) or classes, got Conv: pass"
    ):
        trace(model, torch.randn(1, 3, 64, 64), leaf_modules=(model.model[0],))
    with pytest.raises(TraceError, match=r"got int$"):
        trace(model, torch.randn(1, 3, 64, 64), leaf_modules=[0])


# --- node facts -------------------------------------------------------------------------------------------


def test_each_node_carries_one_frozen_record_of_its_module_calls() -> None:
    traced = trace(SharedBlock(), torch.randn(1, 8, 4, 4))
    second_act = [n for n in nodes(traced) if n.op == "call_module" and n.target == "act"][1]
    record = facts(second_act)
    assert record == NodeFacts((Frame(CallId("", 0), "SharedBlock"), Frame(CallId("act", 1), "ReLU")))
    assert (record.path, record.type_name, record.call) == ("act", "ReLU", CallId("act", 1))
    assert record.calls == (CallId("", 0), CallId("act", 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.frames = ()  # type: ignore[misc]
    loose = {"module_path", "module_type", "module_stack", "module_call", "call_stack", "shapes", "dtypes"}
    assert not any(loose & set(n.meta) for n in nodes(traced))  # one record, not loose keys


def test_shapes_are_fx_tensor_meta_as_shape_prop_writes_it() -> None:
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(2, 3, 8, 8)
    traced = trace(model, x)
    theirs = fx.symbolic_trace(model)
    ShapeProp(theirs).propagate(x)
    for ours, reference in zip(nodes(traced), theirs.graph.nodes, strict=True):
        assert isinstance(ours.meta[TENSOR_META_KEY], TensorMetadata)
        # The tracer's run records no autograd graph: nothing it describes requires grad.
        expected = reference.meta[TENSOR_META_KEY]._replace(requires_grad=False)
        assert ours.meta[TENSOR_META_KEY] == expected
    assert shapes(nodes(traced)[1]) == ((2, 8, 6, 6),) and dtypes(nodes(traced)[1]) == (torch.float32,)


def test_a_node_the_tracer_did_not_make_has_no_facts() -> None:
    plain = fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    node = next(n for n in plain.graph.nodes if n.op == "call_module")
    with pytest.raises(TraceError, match=r"fx node '_0' \(call_module\) carries no rewrite facts"):
        facts(node)
    assert shapes(node) == () and dtypes(node) == ()


# --- TinyYolo ---------------------------------------------------------------------------------------------


def test_tiny_yolo_eval_detect_is_a_leaf_with_visible_convs() -> None:
    model, x = TinyYolo().eval(), torch.randn(1, 3, 64, 64)
    expected = model(x)
    traced = trace(model, x)
    assert [(leaf.path, leaf.type_name) for leaf in traced.leaves] == [("model.15", "Detect")]
    assert [r.path for r in traced.regions] == ["", "model.15.m.0", "model.15.m.1"]
    detect = next(n for n in nodes(traced) if n.op == "call_module" and n.target == "model.15")
    assert shapes(detect) == ((1, 240, 8), (1, 3, 8, 8, 8), (1, 3, 4, 4, 8))
    conv = nodes(traced, "model.15.m.1")[1]
    assert module_stack(conv) == (("", "TinyYolo"), ("model.15", "Detect"), ("model.15.m.1", "Conv2d"))
    assert shapes(conv) == ((1, 24, 4, 4),)
    assert_same_outputs(traced.regions[0].graph_module(x), expected)
    assert_well_formed(traced)


def test_tiny_yolo_train_traces_through_detect() -> None:
    model, x = TinyYolo().train(), torch.randn(2, 3, 64, 64)
    traced = trace(model, x)
    assert traced.leaves == [] and [r.path for r in traced.regions] == [""]
    assert {"model.15.m.0", "model.15.m.1"} <= called_modules(traced)
    assert model.training


def test_yolov5l_sized_model_traces_to_its_output_shapes() -> None:
    # How fast: bench/profile_speed.py (no timing asserts in tests).
    traced = trace(TinyYolo(YOLOV5L).eval(), torch.randn(1, 3, 640, 640))
    assert shapes(nodes(traced)[-1])[0] == (1, 25200, 85)


# --- meta device, no side effects, errors -------------------------------------------------------------------


def test_meta_model_and_inputs_give_the_same_shapes() -> None:
    x = torch.randn(1, 3, 64, 64)
    on_cpu = trace(TinyYolo().eval(), x)
    with torch.device("meta"):
        model = TinyYolo().eval()
    on_meta = trace(model, x.to("meta"))
    assert [r.path for r in on_meta.regions] == [r.path for r in on_cpu.regions]
    for ours, theirs in zip(on_meta.regions, on_cpu.regions, strict=True):
        assert [shapes(n) for n in ours.graph_module.graph.nodes] == [
            shapes(n) for n in theirs.graph_module.graph.nodes
        ]


def test_propagation_runs_on_meta_unless_the_model_needs_real_data() -> None:
    def devices_seen_by(model: nn.Module, probe: nn.Module) -> set[str]:
        seen: set[str] = set()

        def note_device(module: nn.Module, args: tuple) -> None:
            if isinstance(args[0], torch.Tensor):  # hooks also fire while fx traces, with Proxies
                seen.add(args[0].device.type)

        handle = probe.register_forward_pre_hook(note_device)
        try:
            trace(model, torch.randn(1, 3, 64, 64))
        finally:
            handle.remove()
        return seen

    yolo = TinyYolo().eval()
    assert devices_seen_by(yolo, yolo.model[0].conv) == {"meta"}
    failing = FailingRoot().eval()  # `if x.amax() > 100` cannot be decided on meta
    assert "cpu" in devices_seen_by(failing, failing.stem)


@pytest.mark.parametrize("make", [TinyYolo, FailingRoot], ids=["meta-run", "real-run"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_model_is_left_exactly_as_it_was(make: type[nn.Module], training: bool) -> None:
    model = make().train(training)
    model(torch.randn(2, 3, 64, 64))  # fills YOLO's grid cache, as a model in use would have it
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    attributes = {name: dict(module.__dict__) for name, module in model.named_modules()}
    trace(model, torch.randn(2, 3, 64, 64))
    assert model.training is training
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    for name, module in model.named_modules():
        assert module.__dict__ == attributes[name], name
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks), name
    if isinstance(model, TinyYolo):
        assert all(grid.device.type == "cpu" for grid in model.model[-1].grid)


def test_inputs_that_do_not_run_raise_a_one_line_trace_error() -> None:
    with pytest.raises(
        TraceError, match=r"^TinyYolo does not run on the example inputs: RuntimeError: .*"
    ) as info:
        trace(TinyYolo(), torch.randn(1, 4, 64, 64))
    assert "\n" not in str(info.value)
    with pytest.raises(TraceError, match=r"^FailingRoot does not run on the example inputs: .*channels"):
        trace(FailingRoot(), torch.randn(1, 5, 8, 8))
    with pytest.raises(
        TraceError, match=r"^GatedNet does not run on the example inputs: GatedNet\.forward too many"
    ):
        trace(GatedNet(), (torch.randn(1, 3, 8, 8), torch.randn(1)))


def test_without_shape_propagation_nodes_carry_no_shapes() -> None:
    traced = trace(TinyYolo().eval(), torch.randn(1, 3, 64, 64), propagate_shapes=False)
    assert [r.path for r in traced.regions] == ["", "model.15.m.0", "model.15.m.1"]
    assert all(
        TENSOR_META_KEY not in n.meta and isinstance(facts(n), NodeFacts)
        for r in traced.regions
        for n in r.graph_module.graph.nodes
    )


# --- torchvision ------------------------------------------------------------------------------------------

CLASSIFIERS = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_torchvision_classifiers_trace_whole(name: str) -> None:
    model, x = getattr(torchvision.models, name)(weights=None).eval(), torch.randn(1, 3, 64, 64)
    traced = trace(model, x)
    # Classifiers have no data-dependent code: one region, no leaves, and every conv is a call_module node.
    assert traced.leaves == [] and [r.path for r in traced.regions] == [""]
    convs = {path for path, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    assert convs <= called_modules(traced)
    assert_same_outputs(traced.regions[0].graph_module(x), model(x))
    assert shapes(nodes(traced)[-1]) == ((1, 1000),)
    assert_well_formed(traced)
    model.train()
    assert trace(model, torch.randn(2, 3, 64, 64)).leaves == []


DETECTORS = {
    # Every detector's root forward fails (it asserts on image shapes with len(), or, when training, on the
    # types of the targets), and so does GeneralizedRCNNTransform's (`if not image.is_floating_point()`).
    # Faster R-CNN also loses `rpn` and `roi_heads` (box decoding asserts its input is a real Tensor) and
    # `roi_heads.box_predictor` (`if x.dim() == 4` on a Proxy); RetinaNet's, FCOS's and SSD's heads trace.
    "fasterrcnn_resnet50_fpn": {"", "transform", "rpn", "roi_heads", "roi_heads.box_predictor"},
    "retinanet_resnet50_fpn": {"", "transform"},
    "fcos_resnet50_fpn": {"", "transform"},
    "ssdlite320_mobilenet_v3_large": {"", "transform"},
}


@pytest.fixture(scope="module")
def detectors() -> dict[str, nn.Module]:
    built = {}
    for name in DETECTORS:
        small = {} if name.startswith("ssdlite") else {"min_size": 128, "max_size": 128}
        built[name] = getattr(detection, name)(weights=None, weights_backbone=None, **small)
    return built


def detector_inputs(training: bool) -> tuple:
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    if not training:
        return (images,)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 70.0]]), "labels": torch.tensor([1])} for _ in images]
    return (images, targets)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(DETECTORS))
def test_torchvision_detectors_trace_with_leaves(
    detectors: dict[str, nn.Module], name: str, training: bool
) -> None:
    model = detectors[name].train(training)
    traced = trace(model, detector_inputs(training))
    assert {leaf.path for leaf in traced.leaves} == DETECTORS[name]
    assert all(leaf.reason != "user" and "\n" not in leaf.reason for leaf in traced.leaves)
    assert [r.path for r in traced.regions][:2] == ["transform", "backbone"]
    # Each opaque module but the root also keeps its own call, as one node (its inside is in other regions).
    regions = {r.path: r for r in traced.regions}
    for path in DETECTORS[name] - {""}:
        ops = [n.op for n in regions[path].graph_module.graph.nodes if n.op not in ("placeholder", "output")]
        assert ops == ["call_module"], path
    convs = {path for path, module in model.backbone.named_modules() if isinstance(module, nn.Conv2d)}
    assert {f"backbone.{path}" for path in convs} <= called_modules(traced)
    if hasattr(model.backbone, "fpn"):
        assert any(path.startswith("backbone.fpn.") for path in called_modules(traced))
    assert_well_formed(traced)
    assert model.training is training
