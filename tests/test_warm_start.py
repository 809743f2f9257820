"""rewrite.warm_start: new blocks learn what the replaced ones computed, from unlabeled inputs; the original stays.

Tiny budgets (YOLOv5-N at 64x64, a few steps): the figures of the issue come from ``bench/warm_start.py``.
"""

import copy
import math
import re

import pytest
import torch
from torch import nn

import rewrite
from rewrite.blocks import ConvBNAct
from rewrite.warm_start import changed_modules
from rewrite.zoo import create_model


def trained_like(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Give a fresh model BatchNorm statistics of real inputs (its defaults make the neck's features ~1e-9)."""
    momenta = {}
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            momenta[module] = module.momentum
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for module, momentum in momenta.items():
        module.momentum = momentum
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    batches = [torch.rand(2, 3, 64, 64) for _ in range(3)]
    original = trained_like(create_model("yolov5n", nc=3), batches)
    slim = rewrite.apply(original, "slim-neck", torch.zeros(1, 3, 64, 64))
    return original, slim, batches


def test_a_new_block_that_can_compute_the_old_function_learns_it():
    # Any module whose class changed is a site. Here the new block could reproduce the old one exactly, so the
    # warm start must get close: the mechanism, apart from what GS blocks can express.
    class Replacement(ConvBNAct):
        pass

    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    layers = nn.Sequential(ConvBNAct(3, 8, 3), ConvBNAct(8, 16, 3), ConvBNAct(16, 4, 1))
    original = trained_like(layers, batches)
    rewritten = copy.deepcopy(original)
    rewritten[1] = Replacement(8, 16, 3)

    report = rewrite.warm_start(rewritten, original, batches, steps=60, lr=3e-2)

    (site,) = report.sites
    assert (site.path, site.replaced, site.block) == ("1", "ConvBNAct", "Replacement")
    assert site.before > 0.5 and site.after < 0.25 * site.before
    assert report.model_after < 0.25 * report.model_before


def test_a_slim_neck_yolov5_warm_starts_site_by_site(setup):
    original, slim, batches = setup
    slim = copy.deepcopy(slim).train()
    messages = []
    report = rewrite.warm_start(slim, original, batches, steps=4, progress=messages.append)

    paths = ["model.10", "model.13", "model.14", "model.17", "model.18", "model.20", "model.21", "model.23"]
    assert [site.path for site in report.sites] == paths
    assert [(site.replaced, site.block) for site in report.sites[:2]] == [
        ("Conv", "GSConv"),
        ("C3", "VoVGSCSP"),
    ]
    errors = [e for site in report.sites for e in (site.before, site.after)]
    assert all(math.isfinite(e) and e > 0 for e in [*errors, report.model_before, report.model_after])
    assert report.steps == 4 and report.batches == 3 and report.seconds > 0
    assert slim.training and all(m.training for m in slim.modules())  # its modes are put back
    assert messages[0] == "recording the original's features at 8 site(s) on 3 batch(es)"
    assert messages[-1].startswith("whole model: rel. error")

    table = str(report)
    assert re.search(r"(?m)^model\.13\s+C3 → VoVGSCSP\s", table)
    assert "whole model" in table and "8 site(s), 4 step(s) each on 3 batch(es)" in table


def test_the_original_is_left_as_it_was_and_only_new_blocks_change(setup):
    original, slim, batches = setup
    slim = copy.deepcopy(slim)
    weights = {name: t.clone() for name, t in original.state_dict().items()}
    slim_weights = {name: t.clone() for name, t in slim.state_dict().items()}
    detect_grids = list(original.model[-1].grid)
    original.train()
    original.model[3].eval()

    rewrite.warm_start(slim, original, batches, steps=2)

    assert all(torch.equal(weights[name], t) for name, t in original.state_dict().items())
    assert original.training and not original.model[3].training and original.model[4].training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in original.modules())
    # Forward-time caches too: the Detect head's grids are the same objects as before.
    assert all(a is b for a, b in zip(original.model[-1].grid, detect_grids, strict=True))
    changed = {name for name, t in slim.state_dict().items() if not torch.equal(slim_weights[name], t)}
    assert changed and all(
        name.split(".")[1] in {"10", "13", "14", "17", "18", "20", "21", "23"} for name in changed
    )
    original.eval()


def test_changed_modules_lists_the_outermost_paths_whose_class_changed(setup):
    original, slim, _ = setup
    assert changed_modules(slim, original)[:2] == ["model.10", "model.13"]
    assert changed_modules(original, copy.deepcopy(original)) == []


def test_nothing_to_warm_start_and_no_batches_are_one_line_errors(setup):
    original, slim, batches = setup
    with pytest.raises(rewrite.NoMatchError, match="no module of another class than DetectionModel"):
        rewrite.warm_start(copy.deepcopy(original), original, batches)
    with pytest.raises(rewrite.InputSpecError, match="`batches` gave nothing"):
        rewrite.warm_start(copy.deepcopy(slim), original, [])


def test_a_block_that_cannot_improve_keeps_its_fresh_weights():
    # A fresh original's neck features are ~1e-9 (default BatchNorm statistics): nothing fits them in a few
    # steps, and the block must come back as it was rather than worse.
    torch.manual_seed(0)
    original = create_model("yolov5n", nc=3).eval()
    slim = rewrite.apply(original, "slim-neck", torch.zeros(1, 3, 64, 64))
    fresh = copy.deepcopy(slim.model[10].state_dict())
    report = rewrite.warm_start(slim, original, [torch.rand(2, 3, 64, 64)], steps=3)
    assert report.sites[0].after == report.sites[0].before
    assert all(torch.equal(fresh[name], t) for name, t in slim.model[10].state_dict().items())
