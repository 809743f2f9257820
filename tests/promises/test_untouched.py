"""The user's model is never touched by planning, and a failure at one site is a clean one (regressions)."""

import gc

import pytest
import torch
from models import CBA
from rule_sets import chain_rules
from torch import nn

import rewrite
from rewrite.builders import register_builder
from rewrite.execution import full_collections_deferred
from rewrite.zoo import create_model


def conv_rules(builder: str = "GSConv") -> rewrite.RuleSet:
    """Chains from a conv of 8 inputs, to ``builder``: rule ``conv``, which the errors name."""
    return chain_rules(builder=builder, where={"in_channels": 8}, rule="conv")


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = CBA(3, 8)
        self.a = CBA(8, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.a(self.stem(x))


class HandWrittenBatchNorm(nn.Module):
    """Updates its running mean in place in train mode, as hand-written norms do."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.running_mean.mul_(0.9).add_(0.1 * x.mean((0, 2, 3)))
        return x - self.running_mean[None, :, None, None]


class WithHandWrittenNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.conv = nn.Conv2d(8, 8, 3, 1, 1)
        self.norm = HandWrittenBatchNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.stem(x)))


def test_in_place_buffer_updates_do_not_reach_the_model():
    x = torch.randn(2, 3, 16, 16)
    model = CountsCalls().eval()
    rewrite.trace(model, x)
    rewrite.profile(model, x)
    rewrite.plan(model, conv_rules(), x)
    assert int(model.calls) == 0

    model = WithHandWrittenNorm().train()
    before = model.norm.running_mean.clone()
    for step in (rewrite.trace, rewrite.profile, lambda m, x: rewrite.plan(m, conv_rules(), x)):
        step(model, x)
        assert torch.equal(model.norm.running_mean, before)


def test_a_builder_reusing_the_sites_modules_gets_copies():
    @register_builder("KeepsTheNorm")
    def keeps_the_norm(site: rewrite.Site) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(site.in_channels, site.out_channels, 3, 1, 1), site.norm, site.activation
        )

    model = nn.Sequential(CBA(3, 8), CBA(8, 8)).eval()
    x = torch.randn(1, 3, 8, 8)
    expected = model(x)
    new = rewrite.plan(model, conv_rules("KeepsTheNorm"), x).apply()
    assert new[1][1] is not model[1].bn and new[1][2] is not model[1].act
    assert all(not t.is_meta for t in model.state_dict().values())
    assert torch.equal(model(x), expected)


def test_planning_leaves_the_global_random_state_as_it_was():
    model = create_model("yolov5n").eval()
    for inputs in (torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64, device="meta")):
        torch.manual_seed(1)
        rewrite.plan(model, "slim-neck", inputs)
        after_plan = torch.rand(3)
        torch.manual_seed(1)
        assert torch.equal(after_plan, torch.rand(3))


def test_planning_defers_full_garbage_collections_and_puts_the_thresholds_back():
    """A plan holds off the full collections that walk its own objects (execution.full_collections_deferred),
    and leaves the process's thresholds as they were: after a plan, after a failed one, and after nested uses."""
    before = gc.get_threshold()
    seen = []
    model = nn.Sequential(CBA(3, 8), CBA(8, 8)).eval()

    @register_builder("NotesTheThresholds")
    def notes_the_thresholds(site: rewrite.Site) -> nn.Module:
        seen.append(gc.get_threshold())
        return nn.Conv2d(site.in_channels + 1, site.out_channels, 1)  # fails on the site's input

    with pytest.raises(rewrite.BuildError):
        rewrite.plan(model, conv_rules("NotesTheThresholds"), torch.randn(1, 3, 8, 8))
    assert seen[0][:2] == before[:2] and seen[0][2] > before[2]
    rewrite.plan(model, conv_rules(), torch.randn(1, 3, 8, 8))
    with full_collections_deferred(), full_collections_deferred():
        pass
    assert gc.get_threshold() == before


def test_a_block_that_fails_on_the_site_is_a_build_error_naming_site_and_rule():
    @register_builder("WrongChannels")
    def wrong_channels(site: rewrite.Site) -> nn.Module:
        return nn.Conv2d(site.in_channels + 1, site.out_channels, 1)

    @register_builder("ReturnsATuple")
    def returns_a_tuple(site: rewrite.Site) -> nn.Module:
        class Pair(nn.Module):
            def forward(self, x: torch.Tensor) -> tuple:
                return x, x

        return Pair()

    model = nn.Sequential(CBA(3, 8), CBA(8, 8)).eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(rewrite.BuildError, match=r"^site '1': rule 'conv': Conv2d fails on the site's input"):
        rewrite.plan(model, conv_rules("WrongChannels"), x)
    with pytest.raises(
        rewrite.ShapeCheckError, match=r"^site '1': rule 'conv': Pair returns tuple, not one tensor"
    ):
        rewrite.plan(model, conv_rules("ReturnsATuple"), x)


def test_a_site_the_builder_cannot_reproduce_is_rejected_and_the_plan_goes_on():
    model = create_model("yolov5n").eval()
    plan = rewrite.plan(model, "slim-neck", torch.zeros(1, 3, 64, 64), scope="backbone")
    rejected = {r.path: r.reason for r in plan.rejected}
    # model.0 is k6 s2 p2: GSConv pads k//2, so it gives 33x33 where the site gives 32x32
    assert (
        rejected["model.0"]
        == "GSConv gives (1, 16, 33, 33) for input (1, 3, 64, 64), but the site gives (1, 16, 32, 32)"
    )
    assert "model.1" in {site.path for site in plan.sites}
    assert plan.shape_check.passed
    plan.apply()


def test_a_plan_refuses_to_apply_to_a_model_changed_since():
    model = nn.Sequential(CBA(3, 8), CBA(8, 8)).eval()
    plan = rewrite.plan(model, conv_rules(), torch.randn(1, 3, 8, 8))
    model[1] = nn.Identity()
    with pytest.raises(
        rewrite.RewriteError, match=r"changed after it was planned \(1 is now Identity, was CBA\)"
    ):
        plan.apply()


def test_a_graph_module_result_keeps_the_roots_hooks():
    class Inline(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.conv, self.bn = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.conv(self.stem(x))))

    seen = []
    model = Inline().eval()
    model.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    new = rewrite.plan(model, conv_rules(), torch.randn(1, 3, 8, 8)).apply()
    seen.clear()
    new(torch.randn(1, 3, 8, 8))
    assert seen == [torch.Size([1, 8, 8, 8])]
