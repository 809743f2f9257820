"""ultralytics' own detectors (built from their yaml, no weights) rewritten with the built-in rule sets:
YOLOv5u-L with ``slim-neck``, YOLOv8-S and YOLO11-S with ``slim-neck-v8``, at 640."""

import pytest
import torch
from torch.utils import _pytree as pytree
from ultralytics.nn.tasks import DetectionModel

import rewrite
from rewrite.blocks import GSConv, VoVGSCSP
from rewrite.execution import run

CSP_BLOCKS = {"slim-neck": ("C3",), "slim-neck-v8": ("C2f", "C3k2")}


def build(config: str) -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel(config, verbose=False).eval()


@pytest.fixture(
    scope="module",
    params=[
        ("yolov5lu.yaml", "slim-neck"),
        ("yolov8s.yaml", "slim-neck-v8"),
        ("yolo11s.yaml", "slim-neck-v8"),
    ],
    ids=lambda p: p[0],
)
def planned(request):
    config, rules = request.param
    model = build(config)
    return model, rules, rewrite.plan(model, rules, torch.zeros(1, 3, 640, 640))


def neck_layers(model: DetectionModel) -> list[tuple[str, torch.nn.Module]]:
    stages = rewrite.resolve_stages(model)
    return [
        (f"model.{i}", layer)
        for i, layer in enumerate(model.model)
        if stages.stage_of(f"model.{i}") == "neck"
    ]


def test_every_neck_csp_block_and_eligible_conv_is_rewritten(planned):
    model, rules, plan = planned
    csp = [path for path, layer in neck_layers(model) if type(layer).__name__ in CSP_BLOCKS[rules]]
    convs = [
        path
        for path, layer in neck_layers(model)
        if type(layer).__name__ == "Conv" and layer.conv.groups == 1 and layer.conv.out_channels % 2 == 0
    ]
    assert csp and convs
    assert sorted(site.path for site in plan.sites) == sorted(csp + convs)
    assert all(site.kind == "module" for site in plan.sites)
    assert not [
        r for r in plan.rejected if any(r.path.startswith(p + ".") or r.path == p for p in csp + convs)
    ]
    assert plan.shape_check.passed and plan.nothing_rewritten is None
    assert plan.params.after < plan.params.before and plan.flops.after < plan.flops.before
    # a CSP block becomes a VoV-GSCSP with as many GS bottlenecks as it had inner blocks
    for site in plan.sites:
        layer = model.get_submodule(site.path)
        if type(layer).__name__ in CSP_BLOCKS[rules]:
            inner = len(layer.m)
            assert site.after.endswith(f", n={inner})"), site.after


def test_the_rewritten_detector_keeps_its_class_routing_and_outputs_and_trains(planned):
    model, _, plan = planned
    slim = plan.apply()
    assert type(slim) is DetectionModel and slim is not model
    for site in plan.sites:
        old, new = model.get_submodule(site.path), slim.get_submodule(site.path)
        assert isinstance(new, (GSConv, VoVGSCSP))
        assert (new.i, new.f, new.type) == (old.i, old.f, old.type)
    assert sum(p.numel() for p in slim.parameters()) == plan.params.after

    x = torch.rand(1, 3, 640, 640)
    before = run(model, (x,)).value  # the original's shapes are enough: on meta stand-ins
    with torch.no_grad():
        after = slim(x)
    shapes = [tuple(t.shape) for t in pytree.tree_leaves(before)]
    assert shapes == [tuple(t.shape) for t in pytree.tree_leaves(after)]

    slim.train()
    x = torch.rand(2, 3, 128, 128)
    loss = sum(t.float().pow(2).mean() for t in pytree.tree_leaves(slim(x)) if isinstance(t, torch.Tensor))
    loss.backward()
    new_blocks = [slim.get_submodule(site.path) for site in plan.sites]
    assert torch.isfinite(loss)
    assert all(p.grad is not None for block in new_blocks for p in block.parameters())


def test_yolov8n_slim_neck_folds_and_exports_exactly(tmp_path):
    pytest.importorskip("onnxruntime")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    slim = rewrite.apply(build("yolov8n.yaml"), "slim-neck-v8", x).eval()
    folded = rewrite.fold(slim, x)
    # The detector's forward stays its own code, routing each layer by the layer's ``f``: the folded layers keep it.
    assert type(folded) is DetectionModel
    assert [layer.f for layer in folded.model] == [layer.f for layer in slim.model]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        pairs = zip(pytree.tree_leaves(folded(x)), pytree.tree_leaves(slim(x)), strict=True)
        assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs) < 1e-5
    assert rewrite.export_onnx(slim, x, tmp_path / "slim.onnx").max_difference < 1e-4
