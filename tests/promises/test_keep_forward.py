"""A rewrite keeps the user's forward wherever the modules can express it, and never silently freezes a code
path of another train/eval mode."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from rule_sets import CONV_NORM_ACT, GSCONV_FITS, chain_rules
from torch import nn

import rewrite
from rewrite.blocks import GSConv
from rewrite.facts import CallId, Frame, dtypes, facts, shapes


def rules(builder: str = "GSConv") -> rewrite.RuleSet:
    """The issue's rule: a Conv2d → BatchNorm2d → activation chain of 8 inputs, to ``builder``."""
    return chain_rules(("Conv2d", "BatchNorm2d", "activation"), builder, where={"in_channels": 8})


GENERIC = chain_rules(CONV_NORM_ACT, where=GSCONV_FITS, name="generic")


class TrainingBranch(nn.Module):
    """The issue's block: an inline conv-bn-act chain, then a branch on ``self.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.conv = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(self.stem(x))))
        if self.training:
            y = y * 0 + 7.0
        return y

    def describe(self) -> str:
        return "a block with a training branch"


class DropoutAfterChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.conv = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.act(self.bn(self.conv(self.stem(x)))), 0.5, self.training)


class FunctionalActivationBranch(nn.Module):
    """The chain ends in a functional activation: only the traced graph can express the rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.conv = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(self.stem(x))))
        if self.training:
            y = y * 0 + 7.0
        return y


def test_an_inline_chain_is_rewritten_on_the_modules_and_the_forward_kept():
    model, x = TrainingBranch().eval(), torch.randn(2, 3, 8, 8)
    plan = rewrite.plan(model, rules(), x)
    assert [(s.path, s.kind) for s in plan.sites] == [("conv", "modules")]
    new = plan.apply()
    assert type(new) is TrainingBranch and new.describe() == "a block with a training branch"
    assert (
        isinstance(new.conv, GSConv) and isinstance(new.bn, nn.Identity) and isinstance(new.act, nn.Identity)
    )
    assert torch.equal(new(x), new.conv(new.stem(x)))  # eval: the new block's output
    assert torch.equal(new.train()(x), torch.full((2, 8, 8, 8), 7.0))  # train: the user's branch, as before
    assert torch.equal(model.train()(x), torch.full((2, 8, 8, 8), 7.0))


def test_dropout_after_an_inline_chain_still_drops_in_training():
    model, x = DropoutAfterChain().eval(), torch.randn(2, 3, 8, 8)
    new = rewrite.plan(model, rules(), x).apply()
    assert type(new) is DropoutAfterChain
    eval_out = new(x)
    assert torch.equal(eval_out, new(x))
    torch.manual_seed(0)
    train_out = new.train()(x)
    assert (train_out == 0).float().mean() > 0.3  # dropout is live again in training


def test_a_site_only_a_frozen_graph_can_express_is_refused_with_why():
    model, x = FunctionalActivationBranch().eval(), torch.randn(2, 3, 8, 8)
    plan = rewrite.plan(model, rules(), x)
    assert plan.sites == []
    [rejection] = plan.rejected
    assert rejection.reason == (
        "the forward of FunctionalActivationBranch at (root) runs other code in training mode than in eval mode,"
        " and only a rewrite of its traced graph can express this site, which would fix that code for both modes"
        " (allow_frozen=True, or --allow-frozen, rewrites it anyway)"
    )
    assert plan.nothing_rewritten.startswith("nothing rewritten: every candidate was rejected")

    frozen = rewrite.plan(model, rules(), x, allow_frozen=True)
    assert [(s.path, s.kind) for s in frozen.sites] == [("conv", "graph")]
    assert any(
        w.startswith("conv: frozen: the forward of FunctionalActivationBranch") for w in frozen.warnings
    )


def test_resnet18_keeps_its_classes_where_module_edits_express_the_rewrite():
    model, x = torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64)
    plan = rewrite.plan(model, GENERIC, x)
    kinds = {s.kind for s in plan.sites}
    assert len(plan.sites) == 20 and kinds <= {"module", "modules"}
    # each BasicBlock calls one relu twice: it stays in place, since the new block already ends in a ReLU
    assert plan.params.after == plan.params.before + sum(s.params.change for s in plan.sites) == 6_166_056
    new = plan.apply()
    assert type(new) is torchvision.models.ResNet
    assert type(new.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert isinstance(new.layer1[0].relu, nn.ReLU) and isinstance(new.layer1[0].bn1, nn.Identity)
    assert sum(p.numel() for p in new.parameters()) == plan.params.after
    assert new(x).shape == (1, 1000)


def test_a_segmentation_model_keeps_its_class_and_its_ordered_dict_output():
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)
    x = torch.randn(1, 3, 64, 64)
    generic = chain_rules(CONV_NORM_ACT, where={**GSCONV_FITS, "dilation": 1}, name="generic")
    plan = rewrite.plan(model.eval(), generic, x)
    assert plan.sites and {s.kind for s in plan.sites} <= {"module", "modules"} and plan.shape_check.passed
    new = plan.apply()
    assert type(new) is type(model)
    out = new(x)
    assert type(out) is type(model(x)) and list(out) == ["out"]


@pytest.mark.parametrize("name", ["resnet18", "rexnet_100"])
def test_timm_models_keep_their_class_and_methods(name):
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    plan = rewrite.plan(model, GENERIC, torch.randn(1, 3, 64, 64))
    assert plan.sites and {s.kind for s in plan.sites} <= {"module", "modules"}
    new = plan.apply()
    assert type(new) is type(model) and new.pretrained_cfg == model.pretrained_cfg
    new.reset_classifier(7)
    assert new(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert (
        new.forward_features(torch.randn(1, 3, 64, 64)).shape
        == model.forward_features(torch.randn(1, 3, 64, 64)).shape
    )


def test_the_shape_check_runs_in_the_other_mode_too():
    from rewrite.builders import register_builder

    class HalvesInTraining(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y[:, : y.shape[1] // 2] if self.training else y

    @register_builder("HalvesInTraining")
    def halves(site: rewrite.Site) -> nn.Module:
        return HalvesInTraining(site.out_channels)

    model, x = TrainingBranch().eval(), torch.randn(2, 3, 8, 8)
    good = rewrite.plan(model, rules(), x)
    assert good.shape_check.detail == "1 output(s): structure and shapes unchanged, in eval and training mode"
    bad = rewrite.plan(model, rules("HalvesInTraining"), x)
    assert not bad.shape_check.passed
    assert bad.shape_check.detail.startswith("in training mode: output 0 has shape (2, 4, 8, 8)")
    with pytest.raises(rewrite.ShapeCheckError, match="in training mode"):
        bad.apply()


# --- graph sites: what the edited graph keeps -------------------------------------------------------------


class ObservedStem(nn.Module):
    """A forward that calls a module for its side effect only (running statistics), then a site written with a
    functional activation, so the site is a graph rewrite of the root."""

    def __init__(self):
        super().__init__()
        self.observer = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x):
        self.observer(x)  # result unused: it is there to update the statistics
        return F.relu(self.bn(self.conv(x)))


def test_a_graph_rewrite_erases_only_the_sites_nodes():
    model = ObservedStem()
    slim = rewrite.plan(model, GENERIC, torch.randn(2, 8, 8, 8)).apply()

    assert isinstance(slim, torch.fx.GraphModule)
    calls = [node.target for node in slim.graph.nodes if node.op == "call_module"]
    assert calls[0] == "observer" and len(calls) == 2
    before = slim.observer.running_mean.clone()
    slim.train()(torch.randn(2, 8, 8, 8) + 3)
    assert not torch.equal(slim.observer.running_mean, before)  # the call with no users still runs


def test_the_node_calling_a_new_block_carries_the_tracers_facts():
    model = ObservedStem().eval()
    x = torch.randn(2, 8, 8, 8)
    slim = rewrite.plan(model, GENERIC, x).apply()

    (new,) = [
        n
        for n in slim.graph.nodes
        if n.op == "call_module" and isinstance(slim.get_submodule(n.target), GSConv)
    ]
    traced = rewrite.trace(model, x)
    old = next(n for n in traced.regions[0].graph_module.graph.nodes if n.target == "observer")
    new_facts = facts(new)  # the facts docs/design.md lists
    assert (new_facts.path, new_facts.type_name) == (new.target, "GSConv")
    assert new_facts.frames == (facts(old).frames[0], Frame(CallId(new.target, 0), "GSConv"))
    assert shapes(new) == ((2, 16, 8, 8),) and dtypes(new) == dtypes(old)
