"""rewrite.warm_start: new blocks learn what the replaced ones computed, from unlabeled inputs; the original stays.

Tiny budgets (YOLOv5-N at 64x64, a second or two): the figures of the issue come from ``bench/warm_start.py``
(a trained YOLOv8n, measured by its mAP).
"""

import copy
import importlib
import math
import re

import pytest
import torch
from rule_sets import CONV_NORM_ACT, GSCONV_FITS, chain_rule_toml
from torch import nn

import rewrite
from rewrite.blocks import ConvBNAct, GSConv, VoVGSCSP
from rewrite.warm_start import changed_modules
from rewrite.warm_start.end_to_end import fit_end_to_end
from rewrite.warm_start.fitting import autocast
from rewrite.zoo import create_model
from rewrite.zoo.yolov5 import C3, Conv

warm_start_module = importlib.import_module("rewrite.warm_start")  # the package's name is the function


pytestmark = pytest.mark.usefixtures("one_thread")


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

    report = rewrite.warm_start(rewritten, original, batches, seconds=3)

    (site,) = report.sites
    assert (site.path, site.replaced, site.block) == ("1", "ConvBNAct", "Replacement")
    assert site.before > 0.5 and site.after < 0.5 * site.before
    assert report.model_after < 0.5 * report.model_before
    assert site.steps > 0 and report.budget == 3


def test_a_slim_neck_yolov5_warm_starts_from_its_plan(setup):
    original, _, batches = setup
    the_plan = rewrite.plan(original, "slim-neck", torch.zeros(1, 3, 64, 64))
    slim = the_plan.apply().train()
    messages = []
    report = rewrite.warm_start(slim, original, batches, sites=the_plan, seconds=2, progress=messages.append)

    paths = ["model.10", "model.13", "model.14", "model.17", "model.18", "model.20", "model.21", "model.23"]
    assert [site.path for site in report.sites] == paths == [site.path for site in the_plan.sites]
    assert [(site.replaced, site.block) for site in report.sites[:2]] == [
        ("Conv", "GSConv"),
        ("C3", "VoVGSCSP"),
    ]
    errors = [e for site in report.sites for e in (site.before, site.after)]
    assert all(math.isfinite(e) and e > 0 for e in [*errors, report.model_before, report.model_after])
    assert report.model_after <= report.model_before
    assert report.batches == 3 and report.seconds > 0
    assert slim.training and all(m.training for m in slim.modules())  # its modes are put back
    assert messages[0] == "recording the original's features at 8 site(s) on 3 batch(es)"
    assert messages[-1].startswith("whole model: rel. error")

    table = str(report)
    assert re.search(r"(?m)^model\.13\s+C3 → VoVGSCSP( \(copied\))?\s", table)
    assert "whole model" in table and "8 site(s) on 3 batch(es) in " in table and "(budget 2 s)" in table


def test_the_original_is_left_as_it_was_and_only_new_blocks_and_the_head_change(setup):
    original, slim, batches = setup
    slim = copy.deepcopy(slim)
    weights = {name: t.clone() for name, t in original.state_dict().items()}
    slim_weights = {name: t.clone() for name, t in slim.state_dict().items()}
    detect_grids = list(original.model[-1].grid)
    original.train()
    original.model[3].eval()

    report = rewrite.warm_start(slim, original, batches, seconds=1)

    assert all(torch.equal(weights[name], t) for name, t in original.state_dict().items())
    assert original.training and not original.model[3].training and original.model[4].training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in original.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in slim.modules())
    # Forward-time caches too: the Detect head's grids are the same objects as before.
    assert all(a is b for a, b in zip(original.model[-1].grid, detect_grids, strict=True))
    changed = {name for name, t in slim.state_dict().items() if not torch.equal(slim_weights[name], t)}
    # The neck's new blocks, and the modules that run only after the first of them (the rest of the neck, the
    # head) when the end-to-end steps helped.
    sites = {"10", "13", "14", "17", "18", "20", "21", "23"}
    assert changed and {name.split(".")[1] for name in changed} <= sites | {
        "11",
        "12",
        "15",
        "16",
        "19",
        "22",
        "24",
    }
    assert report.tuned == [] or "model.24" in report.tuned
    original.eval()


def test_changed_modules_lists_the_new_blocks_and_not_what_they_absorbed(setup):
    original, slim, _ = setup
    assert changed_modules(slim, original)[:2] == ["model.10", "model.13"]
    assert changed_modules(original, copy.deepcopy(original)) == []


GENERIC_RULE = chain_rule_toml(CONV_NORM_ACT, where={**GSCONV_FITS, "dilation": 1}, activation="inherit")


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """torchvision's resnet18 with BatchNorm statistics of its inputs, rewritten by a generic chain rule."""
    torchvision = pytest.importorskip("torchvision")
    rules = tmp_path_factory.mktemp("rules") / "generic.toml"
    rules.write_text(GENERIC_RULE)
    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 32, 32) for _ in range(2)]
    original = trained_like(torchvision.models.resnet18(num_classes=10), batches)
    the_plan = rewrite.plan(original, rules, torch.zeros(1, 3, 32, 32))
    return original, the_plan, batches


def test_a_resnet18_rewritten_chain_by_chain_warm_starts_without_a_plan(resnet18):
    # 20 sites, 17 of them chains of modules in BasicBlock.forward (their BatchNorms and ReLUs now Identity,
    # a shared ReLU kept after the block): once a bare "optimizer got an empty parameter list".
    original, the_plan, batches = resnet18
    assert len(the_plan.sites) == 20 and sum(site.kind == "modules" for site in the_plan.sites) == 17
    rewritten = the_plan.apply()

    report = rewrite.warm_start(rewritten, original, batches, seconds=2)

    assert [site.path for site in report.sites] == [site.path for site in the_plan.sites]
    kinds = {site.path: site.replaced for site in report.sites}
    assert kinds["conv1"] == "Conv2d+BatchNorm2d+ReLU"  # the stem's own ReLU, now an Identity
    assert kinds["layer1.0.conv1"] == "Conv2d+BatchNorm2d+ReLU"  # the block's shared ReLU, kept in place
    assert kinds["layer1.0.conv2"] == "Conv2d+BatchNorm2d"  # its ReLU comes after the residual sum
    assert kinds["layer2.0.downsample"] == "Sequential"
    assert report.skipped == {} and report.model_after < report.model_before


def test_the_plan_names_the_same_chains(resnet18):
    original, the_plan, batches = resnet18
    assert the_plan.sites[1].modules == ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu")
    assert the_plan.sites[2].modules == ("layer1.0.conv2", "layer1.0.bn2")
    rewritten = the_plan.apply()
    report = rewrite.warm_start(rewritten, original, batches, sites=the_plan, seconds=1)
    assert [site.replaced for site in report.sites[:3]] == [
        "Conv2d+BatchNorm2d+ReLU",
        "Conv2d+BatchNorm2d+ReLU",
        "Conv2d+BatchNorm2d",
    ]
    # A chain is a unit the block can copy from: conv, norm, activation.
    chain = nn.Sequential(*(original.get_submodule(path) for path in the_plan.sites[1].modules))
    assert copy.deepcopy(rewritten.get_submodule("layer1.0.conv1")).warm_start_from(chain)
    assert report.model_after <= report.model_before


def test_a_timm_model_warm_starts(tmp_path):
    timm = pytest.importorskip("timm")
    rules = tmp_path / "generic.toml"
    rules.write_text(GENERIC_RULE)
    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 32, 32) for _ in range(2)]
    original = trained_like(
        timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10), batches
    )
    the_plan = rewrite.plan(original, rules, torch.zeros(1, 3, 32, 32))
    rewritten = the_plan.apply()
    report = rewrite.warm_start(rewritten, original, batches, sites=the_plan, seconds=2)
    assert {site.kind for site in the_plan.sites} == {"module", "modules"}
    assert [site.path for site in report.sites] == [site.path for site in the_plan.sites]
    assert report.model_after < report.model_before


def test_a_site_with_nothing_to_train_is_skipped_and_named(resnet18):
    original, the_plan, batches = resnet18
    rewritten = the_plan.apply()
    report = rewrite.warm_start(
        rewritten, original, batches, sites=["layer1.0.conv1", "layer1.0.bn1"], seconds=1
    )
    assert [site.path for site in report.sites] == ["layer1.0.conv1"]
    assert report.skipped == {"layer1.0.bn1": "its new block has no trainable parameters"}
    assert "skipped layer1.0.bn1: its new block has no trainable parameters" in str(report)
    with pytest.raises(
        rewrite.NoMatchError, match=r"layer1.0.bn1: its new block has no trainable parameters"
    ):
        rewrite.warm_start(rewritten, original, batches, sites=["layer1.0.bn1"], seconds=1)


def test_bad_input_is_a_one_line_error(setup, resnet18):
    original, slim, batches = setup
    with pytest.raises(rewrite.NoMatchError, match="no new block to train against DetectionModel"):
        rewrite.warm_start(copy.deepcopy(original), original, batches)
    with pytest.raises(rewrite.InputSpecError, match="`batches` gave nothing"):
        rewrite.warm_start(copy.deepcopy(slim), original, [])
    for seconds in (0, -1.0, "30", True):
        with pytest.raises(rewrite.InputSpecError, match=r"seconds=.*; pass the time budget as a positive"):
            rewrite.warm_start(copy.deepcopy(slim), original, batches, seconds=seconds)
    with pytest.raises(rewrite.InputSpecError, match="sites names 'model.99', which DetectionModel does not"):
        rewrite.warm_start(copy.deepcopy(slim), original, batches, sites=["model.99"])
    _, other_plan, _ = resnet18
    with pytest.raises(rewrite.InputSpecError, match="the plan's site 'conv1' holds no new block"):
        rewrite.warm_start(copy.deepcopy(slim), original, batches, sites=other_plan)


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
    report = rewrite.warm_start(slim, original, batches, seconds=1, progress=messages.append)
    assert [site.path for site in report.sites if site.copied] == [site.path for site in report.sites]
    assert "copied the replaced modules' weights into 8 block(s)" in messages[1]
    assert f"then {report.end_to_end_steps} together" in str(report)
    assert "Conv → GSConv (copied)" in str(report)
    assert report.model_after <= report.model_before


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
    report = rewrite.warm_start(rewritten, original, batches, seconds=0.5)
    assert not report.sites[0].copied


def three_layers(batches):
    return trained_like(nn.Sequential(ConvBNAct(3, 8, 3), ConvBNAct(8, 16, 3), ConvBNAct(16, 4, 1)), batches)


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
    original = three_layers(batches)
    original[0] = trained_like(Counted(3, 8, 3), batches)
    targets = [original(batch).detach() for batch in batches]
    calls, steps = [], []
    for seconds in (0.0, 0.3):
        rewritten = copy.deepcopy(original)
        rewritten[1] = GSConv(8, 16, 3)
        Counted.calls = 0
        taken, _ = fit_end_to_end(
            rewritten, [rewritten[1]], [(b,) for b in batches], targets, lr=1e-2, seconds=seconds
        )
        calls.append(Counted.calls)
        steps.append(taken)
        assert "forward" not in vars(rewritten[0])  # its own forward is back
    assert steps[0] == 1 and steps[1] > 1  # a spent budget still gets one step
    assert calls[0] == calls[1]


def test_the_end_to_end_steps_also_train_what_runs_only_after_the_new_blocks():
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
    rewritten = copy.deepcopy(original)
    rewritten.body = GSConv(8, 8, 3)
    before = copy.deepcopy(rewritten.state_dict())
    report = rewrite.warm_start(rewritten, original, batches, seconds=1)
    after = rewritten.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # The shared PReLU ran before the new block: it stays as it was.
    assert {name.split(".")[0] for name in changed} == {"body", "head"}
    assert "head.0.bias" not in changed
    assert report.tuned == ["head"] and "with head" in str(report)
    assert report.model_after < report.model_before


def test_depthwise_convolutions_compute_in_float32_inside_the_bfloat16_autocast_on_a_cpu():
    torch.manual_seed(0)
    depthwise, dense = nn.Conv2d(8, 8, 5, padding=2, groups=8), nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        expected, expected_rounded = depthwise(x), depthwise(x.bfloat16().float()).bfloat16()
        with autocast(depthwise, enabled=True):
            assert depthwise(x).dtype == torch.float32
            assert torch.equal(depthwise(x), expected)
            assert depthwise(x.bfloat16()).dtype == torch.bfloat16  # back to the stream's dtype
            assert torch.equal(depthwise(x.bfloat16()), expected_rounded)
            assert dense(x).dtype == torch.bfloat16


def test_where_bfloat16_is_native_steps_compute_in_it_and_keep_float32_weights(monkeypatch):
    monkeypatch.setattr(warm_start_module, "native_bfloat16", lambda model: True)
    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 16, 16) for _ in range(2)]
    original = three_layers(batches)
    rewritten = copy.deepcopy(original)
    rewritten[1] = GSConv(8, 16, 3)
    dtypes = set()
    rewritten[1].cv1.conv.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    report = rewrite.warm_start(rewritten, original, batches, seconds=1)
    assert torch.bfloat16 in dtypes  # the training steps
    assert torch.float32 in dtypes  # the errors before and after, measured in float32
    assert all(p.dtype == torch.float32 for p in rewritten.parameters())
    assert report.model_after < report.model_before


def test_forward_hooks_look_without_changing_and_go_away_even_on_an_error():
    from rewrite.warm_start.hooks import forward_hooks

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    seen = []
    modules = dict(model.named_children())
    with forward_hooks(
        modules,
        before=lambda path, module, args: seen.append(("called", path)),
        after=lambda path, module, args, output: seen.append(("returned", path)),
    ):
        model(torch.zeros(1, 2))
    assert seen == [("called", "0"), ("returned", "0"), ("called", "1"), ("returned", "1")]
    with pytest.raises(RuntimeError), forward_hooks(modules, after=lambda *args: seen.append(args)):
        model(torch.zeros(1, 3))  # the wrong width: the forward fails
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
