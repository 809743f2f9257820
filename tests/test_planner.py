"""plan() / apply(): matching semantics, module swaps and graph rewrites, all-or-nothing, shape checks."""

import pytest
import torch
from models import TinyYolo
from rule_sets import GSCONV_FITS, chain_rule_toml, chain_rules
from torch import nn

import rewrite
from rewrite.builders import register_builder
from rewrite.errors import BuildError, NoMatchError, NoMatchWarning, ScopeError
from rewrite.execution import run
from rewrite.rewriter import build_sites, rewrite_model
from rewrite.rules import parse_rules

CONV_RULES = chain_rules(where=GSCONV_FITS)  # rule "conv-to-gsconv"


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


class ThreeAttributes(nn.Module):
    """conv → bn → act called one after another in the root's own forward, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.conv(x)))) * 2

    def describe(self) -> str:
        return "three attributes"


def test_chain_in_a_users_forward_is_rewritten_on_its_modules():
    model = ThreeAttributes().eval()
    x = torch.rand(2, 3, 16, 16)
    before = snapshot(model)
    plan = rewrite.plan(model, CONV_RULES, x, scope="conv,bn,act")

    assert [(s.path, s.kind, s.before, s.after) for s in plan.sites] == [
        ("conv", "modules", "Conv2d(3→16, k3, s1)", "GSConv(3→16, k3, s1)")
    ]
    new = plan.apply()
    # documented: the forward is kept; the chain's first module is the new block, the others Identity
    assert type(new) is ThreeAttributes and new.describe() == "three attributes"
    assert isinstance(new.bn, nn.Identity) and isinstance(new.act, nn.Identity)
    assert new(x).shape == model(x).shape
    assert not any(isinstance(m, nn.BatchNorm2d) and m is model.bn for m in new.modules())
    assert_untouched(model, before)
    assert model.describe() == "three attributes"


def test_back_to_back_matches_and_the_scope():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.Conv2d(8, 6, 1),
    ).eval()
    plan = rewrite.plan(model, CONV_RULES, torch.rand(1, 3, 12, 12))
    # The second chain starts right where the first ends; the last conv has no norm or activation.
    assert [s.path for s in plan.sites] == ["0", "3", "6"]
    scoped = rewrite.plan(model, CONV_RULES, torch.rand(1, 3, 12, 12), scope="3,4,5")
    assert [s.path for s in scoped.sites] == ["3"]


def test_where_rejections_are_kept_with_their_reason():
    model = TinyYolo().eval()
    # Detect's 1x1 output convs give 3 anchors x (nc + 5) = 24 channels, which a multiple of 16 turns down.
    strict_rules = chain_rules(where={**GSCONV_FITS, "out_channels": {"multiple_of": 16}})
    plan = rewrite.plan(model, strict_rules, torch.rand(1, 3, 64, 64), scope="head")
    rejected = {r.path: r.reason for r in plan.rejected}
    assert rejected["model.15.m.0"] == "out_channels 24 is not a multiple of 16"
    assert not plan.sites


def test_a_rule_that_matches_nothing_warns_or_fails_when_strict():
    rules = parse_rules(
        chain_rule_toml(where=GSCONV_FITS)
        + """
[[rule]]
name = "no-such-block"
match.module = "BottleneckCSP"
replace.builder = "VoVGSCSP"
"""
    )
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    with pytest.warns(NoMatchWarning, match="rule 'no-such-block' matched nothing"):
        plan = rewrite.plan(model, rules, torch.rand(1, 3, 8, 8))
    assert any("no-such-block" in w for w in plan.warnings)
    with pytest.raises(NoMatchError, match="rule 'no-such-block' matched nothing"):
        rewrite.plan(model, rules, torch.rand(1, 3, 8, 8), strict=True)


def test_a_scope_that_matches_nothing_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    with pytest.raises(ScopeError):
        rewrite.plan(model, CONV_RULES, torch.rand(1, 3, 8, 8), scope="model.99")


def test_a_failing_build_leaves_the_model_untouched():
    calls = []

    @register_builder("FailsSecondTime", override=True)
    def fails_second_time(site):
        calls.append(site.path)
        if len(calls) > 1:
            raise ValueError("no more")
        return nn.Conv2d(site.in_channels, site.out_channels, 1, site.stride)

    rules = chain_rules(builder="FailsSecondTime", where=GSCONV_FITS)
    model = TinyYolo().eval()
    before = snapshot(model)
    layer_types = [type(m) for m in model.modules()]
    with pytest.raises(BuildError, match="no more") as error:
        rewrite.plan(model, rules, torch.rand(1, 3, 64, 64), scope="neck")
    assert "\n" not in str(error.value)
    assert_untouched(model, before)
    assert [type(m) for m in model.modules()] == layer_types


def test_a_block_of_the_wrong_shape_is_named_by_its_site():
    @register_builder("WrongChannels", override=True)
    def wrong_channels(site):
        return nn.Conv2d(site.in_channels, site.out_channels + 2, 1, site.stride)

    rules = chain_rules(builder="WrongChannels", where=GSCONV_FITS)
    model = TinyYolo().eval()
    # a block that cannot stand in for its site is a rejected candidate, and the plan goes on without it
    plan = rewrite.plan(model, rules, torch.rand(1, 3, 64, 64), scope="neck")
    rejected = {(r.path, r.rule): r.reason for r in plan.rejected}
    assert rejected[("model.8", "conv-to-gsconv")].startswith("Conv2d gives (1, ")
    assert "but the site gives" in rejected[("model.8", "conv-to-gsconv")]
    assert "model.8" not in {site.path for site in plan.sites}


def test_new_blocks_take_the_mode_device_and_dtype_of_what_they_replace():
    model = TinyYolo().double().train()
    new = rewrite.apply(model, "slim-neck", torch.rand(2, 3, 64, 64, dtype=torch.float64))
    assert all(m.training for m in new.modules())
    assert {p.dtype for p in new.parameters()} == {torch.float64}


def test_the_slim_neck_rule_set_works_on_a_yolo_style_model_from_another_package():
    torch.manual_seed(0)
    model = TinyYolo().eval()
    x = torch.rand(1, 3, 64, 64)
    before = snapshot(model)
    plan = rewrite.plan(model, "slim-neck", x)

    assert [(s.path, s.after.split("(")[0]) for s in plan.sites] == [
        ("model.8", "GSConv"),
        ("model.11", "VoVGSCSP"),
        ("model.12", "GSConv"),
        ("model.14", "VoVGSCSP"),
    ]
    assert plan.params.after < plan.params.before and plan.flops.after < plan.flops.before
    assert plan.shape_check.passed
    assert {leaf.type_name for leaf in plan.leaves} == {"Detect"}

    new = plan.apply()
    assert_untouched(model, before)
    assert type(new) is TinyYolo and new.model[8].f == -1 and new.model[11].i == 11
    eval_out = new(x)
    assert eval_out[0].shape == model(x)[0].shape
    new.train()
    raw = new(x)
    sum(r.float().mean() for r in raw).backward()
    assert all(p.grad is not None for p in new.model[11].parameters())


class CachesABias(nn.Module):
    """Keeps a tensor in a plain list attribute, filled by its first forward, as anchor-grid caches do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.cache: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cache:
            self.cache.append(torch.ones(1, 8, 1, 1))
        return self.conv(x) + self.cache[0]


def test_a_weight_free_copy_moves_tensors_a_forward_cached_to_meta_too():
    model = CachesABias().eval()
    x = torch.rand(1, 3, 8, 8)
    model(x)  # the cache now holds a CPU tensor, which a weight-free copy must not keep on the CPU
    plan = rewrite.plan(model, CONV_RULES, x)
    assert plan.device == "meta" and [s.path for s in plan.sites] == ["conv"]
    assert model.cache[0].device.type == "cpu"  # the meta runs put the cached tensor back
    assert plan.apply()(x).shape == (1, 8, 8, 8)

    prepared = plan._prepared
    sites = build_sites(model, prepared.matches, device=torch.device("meta"))
    copy = rewrite_model(model, prepared.traced, sites, on_meta=True)
    assert model.cache[0].device.type == "cpu" and copy.cache[0] is not model.cache[0]
    # a constant that small may be read as a number, so the copy keeps it real; meta runs move it there
    outcome = run(copy, (x,))
    assert outcome.device.type == "meta" and outcome.value.shape == (1, 8, 8, 8)
