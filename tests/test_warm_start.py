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
from rewrite.blocks import ConvBNAct, GSConv, VoVGSCSP
from rewrite.warm_start import _autocast, changed_modules
from rewrite.zoo import create_model
from rewrite.zoo.yolov5 import C3, Conv


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
    with pytest.raises(rewrite.InputSpecError, match="end_to_end_seconds=0; pass a positive number"):
        rewrite.warm_start(copy.deepcopy(slim), original, batches, end_to_end_seconds=0)


def test_a_block_that_cannot_improve_keeps_its_fresh_weights():
    # A fresh original's neck features are ~1e-9 (default BatchNorm statistics): nothing fits them in a few
    # steps, and the block must come back as it was rather than worse.
    # The block copies nothing (nothing it could copy would be checked here).
    class Uncopied(GSConv):
        def warm_start_from(self, replaced: nn.Module) -> bool:
            return False

    torch.manual_seed(0)
    original = create_model("yolov5n", nc=3).eval()
    slim = rewrite.apply(original, "slim-neck", torch.zeros(1, 3, 64, 64))
    block = slim.model[10]
    uncopied = Uncopied(block.cv1.conv.in_channels, 2 * block.cv1.conv.out_channels)
    uncopied.load_state_dict(block.state_dict())
    uncopied.i, uncopied.f = block.i, block.f  # what the detector's forward reads of its layers
    slim.model[10] = uncopied
    fresh = copy.deepcopy(slim.model[10].state_dict())
    report = rewrite.warm_start(slim, original, [torch.rand(2, 3, 64, 64)], steps=3)
    assert report.sites[0].after == report.sites[0].before
    assert all(torch.equal(fresh[name], t) for name, t in slim.model[10].state_dict().items())


def randomised_statistics(module: nn.Module) -> nn.Module:
    """Give every BatchNorm of ``module`` non-trivial statistics and affine parameters, so copies are tested."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.running_mean.normal_(generator=generator)
                norm.running_var.uniform_(0.5, 2, generator=generator)
                norm.weight.normal_(generator=generator)
                norm.bias.normal_(generator=generator)
    return module.eval()


@pytest.mark.parametrize("shuffle", ["split", "interleave"])
@pytest.mark.parametrize(("kernel", "stride"), [(1, 1), (3, 2)])
def test_a_gsconv_copied_from_a_conv_computes_exactly_half_of_its_output_channels(shuffle, kernel, stride):
    torch.manual_seed(0)
    conv = randomised_statistics(Conv(16, 32, kernel, stride))
    gsconv = GSConv(16, 32, kernel, stride, shuffle=shuffle).eval()
    assert gsconv.warm_start_from(conv)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        expected, got = conv(x), gsconv(x)
    exact = [torch.allclose(got[:, c], expected[:, c], atol=1e-5) for c in range(32)]
    assert sum(exact) == 16


def test_a_gsconv_copies_nothing_from_a_module_of_another_shape_or_structure():
    gsconv = GSConv(16, 32, 3, 2)
    fresh = copy.deepcopy(gsconv.state_dict())
    assert not gsconv.warm_start_from(Conv(16, 32, 1, 1))  # another kernel
    assert not gsconv.warm_start_from(Conv(16, 64, 3, 2))  # other channels
    relu = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
    assert not gsconv.warm_start_from(relu)  # another activation
    assert not gsconv.warm_start_from(C3(16, 32))  # more than one conv
    assert all(torch.equal(fresh[name], t) for name, t in gsconv.state_dict().items())


def test_a_vovgscsp_copied_from_a_c3_computes_it_exactly_when_given_its_bottlenecks():
    # cv1, cv2 and cv3 are found by dataflow; with the C3's own bottlenecks in place of the GSBottlenecks the
    # block computes the C3 exactly, which checks which conv went where and cv3's column order.
    torch.manual_seed(0)
    c3 = randomised_statistics(C3(32, 32, 1, shortcut=False))
    block = VoVGSCSP(32, 32, 1).eval()
    assert block.warm_start_from(c3)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert torch.all(block.gsb(block.cv1(x)) == 0)  # the bottlenecks start silent
        block.gsb = c3.m
        torch.testing.assert_close(block(x), c3(x))


def test_a_vovgscsp_falls_back_to_fitting_when_the_structure_does_not_match():
    class NotCSP(nn.Module):  # three units, but the output is a sum of two branches, not a concatenation
        def __init__(self):
            super().__init__()
            self.cv1, self.cv2, self.cv3 = Conv(32, 16), Conv(32, 16), Conv(16, 32)

        def forward(self, x):
            return self.cv3(self.cv1(x) + self.cv2(x))

    class Untraceable(C3):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return super().forward(x)
            return x

    block = VoVGSCSP(32, 32, 1)
    fresh = copy.deepcopy(block.state_dict())
    for replaced in (NotCSP(), Untraceable(32, 32), Conv(32, 32), C3(32, 64)):
        assert not block.warm_start_from(replaced)
    assert all(torch.equal(fresh[name], t) for name, t in block.state_dict().items())


def test_warm_start_copies_into_blocks_that_can_and_trains_them_together(setup):
    original, slim, batches = setup
    slim = copy.deepcopy(slim)
    messages = []
    report = rewrite.warm_start(
        slim, original, batches, steps=2, end_to_end_steps=3, progress=messages.append
    )
    assert [site.path for site in report.sites if site.copied] == [site.path for site in report.sites]
    assert "copied the replaced modules' weights into 8 block(s)" in messages[1]
    assert any(m.startswith("all 8 block(s) together") for m in messages)
    assert report.end_to_end_steps == 3 and "then 3 together" in str(report)
    assert "Conv → GSConv (copied)" in str(report)
    assert report.model_after <= report.model_before
    assert all(site.after < site.before for site in report.sites[:1])  # the exact half shows at once


def test_a_copy_that_brings_the_block_no_closer_is_undone():
    # The replaced module looks like conv -> norm -> activation but computes something else (its forward
    # negates the result): the copy cannot help, and the block keeps its fresh weights.
    class Negated(ConvBNAct):
        def forward(self, x):
            return -super().forward(x)

    torch.manual_seed(0)
    batches = [torch.rand(4, 8, 12, 12) for _ in range(2)]
    original = trained_like(nn.Sequential(ConvBNAct(8, 8, 3), Negated(8, 16, 3)), batches)
    rewritten = copy.deepcopy(original)
    rewritten[1] = GSConv(8, 16, 3)
    report = rewrite.warm_start(rewritten, original, batches, steps=0)
    assert not report.sites[0].copied


def test_the_end_to_end_steps_replay_what_runs_before_the_first_new_block():
    # The first layer runs before any new block: the end-to-end steps replay its recorded outputs rather than
    # run it, so its calls do not grow with the steps.
    class Counted(ConvBNAct):
        calls = 0

        def forward(self, x):
            Counted.calls += 1
            return super().forward(x)

    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    original = trained_like(
        nn.Sequential(Counted(3, 8, 3), ConvBNAct(8, 16, 3), ConvBNAct(16, 4, 1)), batches
    )
    calls = []
    for steps in (2, 8):
        rewritten = copy.deepcopy(original)
        rewritten[1] = GSConv(8, 16, 3)
        Counted.calls = 0
        report = rewrite.warm_start(rewritten, original, batches, steps=0, end_to_end_steps=steps, lr=1e-2)
        calls.append(Counted.calls)
        assert math.isfinite(report.model_after)
        assert "forward" not in vars(rewritten[0])  # its own forward is back
    assert calls[0] == calls[1]


def test_a_time_budget_ends_the_end_to_end_steps_and_a_step_budget_caps_them():
    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    original = trained_like(
        nn.Sequential(ConvBNAct(3, 8, 3), ConvBNAct(8, 16, 3), ConvBNAct(16, 4, 1)), batches
    )
    reports = []
    for steps, seconds in [(0, 0.5), (3, 60.0)]:
        rewritten = copy.deepcopy(original)
        rewritten[1] = GSConv(8, 16, 3)
        reports.append(
            rewrite.warm_start(
                rewritten,
                original,
                batches,
                steps=0,
                end_to_end_steps=steps,
                end_to_end_seconds=seconds,
                end_to_end_lr=3e-3,
            )
        )
    timed, capped = reports
    assert timed.end_to_end_steps > 0 and timed.model_after < timed.model_before
    assert capped.end_to_end_steps == 3  # long before a minute


def test_end_to_end_downstream_also_trains_what_runs_only_after_the_new_blocks():
    class SharedActivation(nn.Module):
        """One PReLU object after the stem and after the body, as public detector code shares activations."""

        def __init__(self, body: nn.Module) -> None:
            super().__init__()
            self.stem, self.body, self.act = ConvBNAct(3, 8, 3), body, nn.PReLU()
            self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1))

        def forward(self, x):
            return self.head(self.act(self.body(self.act(self.stem(x)))))

    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    original = trained_like(SharedActivation(ConvBNAct(8, 8, 3)), batches)
    original.head[0].bias.requires_grad_(False)  # frozen by its author: stays so
    results = {}
    for downstream in (False, True):
        rewritten = copy.deepcopy(original)
        rewritten.body = GSConv(8, 8, 3)
        before = copy.deepcopy(rewritten.state_dict())
        report = rewrite.warm_start(
            rewritten,
            original,
            batches,
            steps=0,
            end_to_end_steps=30,
            end_to_end_lr=3e-3,
            end_to_end_downstream=downstream,
        )
        after = rewritten.state_dict()
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        # The shared PReLU ran before the new block: it stays as it was.
        assert {name.split(".")[0] for name in changed} == ({"body", "head"} if downstream else {"body"})
        assert "head.0.bias" not in changed
        assert report.tuned == (["head"] if downstream else [])
        assert ("with head" in str(report)) == downstream
        results[downstream] = report.model_after
    assert results[True] < results[False]


def test_depthwise_convolutions_compute_in_float32_inside_the_bfloat16_autocast_on_a_cpu():
    torch.manual_seed(0)
    depthwise, dense = nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        expected, expected_rounded = depthwise(x), depthwise(x.bfloat16().float()).bfloat16()
        with _autocast(depthwise, enabled=True):
            assert depthwise(x).dtype == torch.float32
            assert torch.equal(depthwise(x), expected)
            assert depthwise(x.bfloat16()).dtype == torch.bfloat16  # back to the stream's dtype
            assert torch.equal(depthwise(x.bfloat16()), expected_rounded)
            assert dense(x).dtype == torch.bfloat16


@pytest.mark.parametrize(("steps", "end_to_end_steps"), [(0, 20), (20, 0)])
def test_bfloat16_steps_compute_in_bfloat16_and_keep_float32_weights(steps, end_to_end_steps):
    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    original = trained_like(
        nn.Sequential(ConvBNAct(3, 8, 3), ConvBNAct(8, 16, 3), ConvBNAct(16, 4, 1)), batches
    )
    rewritten = copy.deepcopy(original)
    rewritten[1] = GSConv(8, 16, 3)
    dtypes = set()
    rewritten[1].cv1.conv.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    report = rewrite.warm_start(
        rewritten,
        original,
        batches,
        steps=steps,
        lr=1e-2,
        end_to_end_steps=end_to_end_steps,
        end_to_end_lr=3e-3,
        bfloat16=True,
    )
    assert torch.bfloat16 in dtypes  # the training steps
    assert torch.float32 in dtypes  # the errors before and after, measured in float32
    assert all(p.dtype == torch.float32 for p in rewritten.parameters())
    assert report.model_after < report.model_before
