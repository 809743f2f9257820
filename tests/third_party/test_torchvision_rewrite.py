"""The FPN rule set on torchvision's detectors: rewritten copies run in eval and in train with a backward pass."""

import pytest
import torch

import rewrite
from rewrite.blocks import GSConv

torchvision = pytest.importorskip("torchvision")
detection = torchvision.models.detection

IMAGES = [torch.rand(3, 128, 128), torch.rand(3, 112, 128)]
TARGETS = [
    {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
    {
        "boxes": torch.tensor([[30.0, 20.0, 90.0, 100.0], [5.0, 5.0, 40.0, 30.0]]),
        "labels": torch.tensor([2, 3]),
    },
]


@pytest.mark.parametrize(
    "builder, expected_sites",
    [
        (detection.fasterrcnn_resnet50_fpn, [f"backbone.fpn.layer_blocks.{i}" for i in (3, 2, 1, 0)]),
        (detection.retinanet_resnet50_fpn, [f"backbone.fpn.layer_blocks.{i}" for i in (2, 1, 0)]),
    ],
    ids=["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"],
)
def test_fpn_output_convs_become_gsconv_and_the_detector_still_trains(builder, expected_sites):
    torch.manual_seed(0)
    model = builder(weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=128).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    plan = rewrite.plan(model, "torchvision-fpn-gsconv", (IMAGES,))
    assert [site.path for site in plan.sites][: len(expected_sites)] == expected_sites
    assert {site.stage for site in plan.sites} == {"neck"}
    assert all(r.reason == "kernel_size 1 is not 3" for r in plan.rejected if ".inner_blocks." in r.path)
    assert plan.stages["neck"].params.after < plan.stages["neck"].params.before
    assert plan.stages["backbone"].params.change == 0
    assert plan.shape_check.passed, plan.shape_check.detail

    new = plan.apply()
    assert all(
        torch.equal(model.state_dict()[k], v) for k, v in before.items()
    )  # the user's model is untouched
    assert type(new) is type(model)
    assert all(isinstance(new.get_submodule(path), GSConv) for path in expected_sites)

    detections = new(IMAGES)
    assert [sorted(d) for d in detections] == [["boxes", "labels", "scores"]] * 2

    new.train()
    losses = new(IMAGES, TARGETS)
    sum(losses.values()).backward()
    gs = new.get_submodule(expected_sites[0])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gs.parameters())
