"""Detector code as users have it: shared and aliased modules, modules called more than once, blocks that fx
cannot trace. Each case checks the sites, the figures, and that the forward that runs is the rewritten one."""

import copy

import pytest
import torch
from models import (
    AliasAfter,
    AliasBefore,
    C2fNet,
    CheckedRoutedLayers,
    LoopedBlock,
    ReusedConv,
    share_activations,
    with_opaque_root,
)
from reference import BASE, SLIM_NECK
from test_slim_neck_zoo import NECK_CONVS, NECK_CSPS

import rewrite
from rewrite.blocks import GSConv, VoVGSCSP
from rewrite.facts import facts
from rewrite.tracer import trace
from rewrite.zoo import create_model

CBA_RULES = rewrite.parse_rules(
    """
[ruleset]
name = "cba"
[[rule]]
name = "cba-to-gsconv"
match.module = ["CBA"]
where.in_channels = 8
replace.builder = "GSConv"
"""
)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_yolo(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name).eval()


@pytest.mark.parametrize("opaque", [False, True], ids=["traced-root", "opaque-root"])
def test_shared_class_attribute_activation_rewrites_as_the_zoo_does(opaque):
    model = share_activations(meta_yolo("yolov5l"))
    if opaque:
        model = with_opaque_root(model)
    acts = {id(m.act) for m in model.modules() if hasattr(m, "act")}
    assert len(acts) == 1  # one SiLU object for every block, as in the public code

    plan = rewrite.plan(model, "slim-neck", torch.zeros(1, 3, 640, 640, device="meta"))

    assert [site.path for site in plan.sites] == sorted(NECK_CONVS + NECK_CSPS, key=lambda p: int(p[6:]))
    assert all(site.kind == "module" for site in plan.sites)
    assert not plan.rejected and plan.nothing_rewritten is None
    assert (plan.params.before, plan.flops.before) == BASE["yolov5l"]
    assert (plan.params.after, plan.flops.after) == SLIM_NECK["yolov5l"]
    assert [leaf.path for leaf in plan.leaves][:1] == ([""] if opaque else ["model.24"])


def test_calls_of_a_shared_activation_are_credited_to_the_caller():
    model = share_activations(create_model("yolov5n").eval())
    for opaque in (False, True):
        traced = trace(with_opaque_root(model) if opaque else model, torch.zeros(1, 3, 64, 64))
        paths = {
            facts(node).path
            for region in traced.regions
            for node in region.graph_module.graph.nodes
            if facts(node).type_name == "SiLU"
        }
        assert {"model.0.act", "model.10.act", "model.13.cv3.act", "model.23.m.0.cv2.act"} <= paths


@pytest.mark.parametrize("model_class", [AliasBefore, AliasAfter])
def test_an_aliased_block_is_replaced_under_every_name(model_class):
    model = model_class().eval()
    x = torch.randn(2, 3, 16, 16)
    plan = rewrite.plan(model, CBA_RULES, x)
    assert [(site.path, site.kind) for site in plan.sites] == [("layers.1", "module")]

    new = plan.apply()
    assert isinstance(new.layers[1], GSConv) and new.last is new.layers[1]
    assert type(new) is model_class
    assert params(new) == plan.params.after == plan.params.before + plan.sites[0].params.change
    assert not any(key.startswith(("last.conv", "layers.1.conv")) for key in new.state_dict())
    # the forward that runs is the rewritten one
    assert torch.equal(new(x), new.layers[1](new.layers[0](x)))


def test_a_block_called_in_a_loop_is_rewritten_once_and_kept_shared():
    model = LoopedBlock().eval()
    x = torch.randn(1, 3, 16, 16)
    plan = rewrite.plan(model, CBA_RULES, x)
    [site] = plan.sites
    assert (site.path, site.kind, site.calls, site.untied) == ("block", "module", 3, "")
    new = plan.apply()
    assert isinstance(new.block, GSConv) and type(new) is LoopedBlock
    assert params(new) == plan.params.after == 824 - 592 + params(new.block)
    # three calls of one block: the per-site FLOPs count all three, and the totals agree with them
    assert plan.flops.change == site.flops.change
    out = new.stem(x)
    for _ in range(3):
        out = new.block(out)
    assert torch.equal(new(x), out)


def test_a_module_whose_calls_differ_is_untied_and_the_report_says_so():
    model = ReusedConv().eval()
    x = torch.randn(1, 3, 16, 16)
    rules = rewrite.parse_rules(
        '[ruleset]\nname = "c"\n[[rule]]\nname = "conv"\nmatch.chain = ["Conv2d", "BatchNorm2d?", "activation?"]\n'
        'where.in_channels = 8\nreplace.builder = "GSConv"\nreplace.activation = "identity"'
    )
    plan = rewrite.plan(model, rules, x)
    assert [(s.path, s.kind, s.calls) for s in plan.sites] == [("conv", "graph", 1), ("conv", "graph", 1)]
    assert all(s.untied == "conv called 2 times; this call gets a block of its own" for s in plan.sites)
    assert [w for w in plan.warnings if "untied" in w] == [f"conv: untied: {plan.sites[0].untied}"] * 2
    new = plan.apply()
    # two independent blocks, one per call: the copy holds what the report says
    blocks = [m for m in new.modules() if isinstance(m, GSConv)]
    assert len(blocks) == 2 and blocks[0] is not blocks[1]
    assert params(new) == plan.params.after == params(model) - 8 * 8 * 9 - 8 - 16 + sum(map(params, blocks))
    assert new(x).shape == model(x).shape


def test_an_opaque_csp_block_is_one_site_with_its_own_input_and_output():
    model = C2fNet().eval()
    x = torch.randn(1, 3, 32, 32)
    rules = rewrite.parse_rules(
        '[ruleset]\nname = "v"\n[[rule]]\nname = "csp"\nmatch.module = ["C2fLike"]\n'
        'replace.builder = "VoVGSCSP"\nreplace.n = { len = "m" }\nreplace.shuffle = "interleave"\n'
        'replace.activation = "inherit"'
    )
    traced = trace(model, x)
    assert [leaf.path for leaf in traced.leaves] == ["block"]

    plan = rewrite.plan(model, rules, x)
    [site] = plan.sites
    assert (site.path, site.kind, site.before, site.after) == (
        "block",
        "module",
        "C2fLike(16→32, s1)",
        "VoVGSCSP(16→32, s1, n=2)",
    )
    new = plan.apply()
    assert isinstance(new.block, VoVGSCSP) and (new.block.i, new.block.f) == (1, -1)
    assert params(new) == plan.params.after
    assert torch.equal(new(x), new.head(new.block(new.stem(x))))


def test_a_plan_that_rewrites_nothing_says_so_first():
    model = share_activations(create_model("yolov5n").eval())
    x = torch.zeros(1, 3, 64, 64)
    with pytest.warns(rewrite.NoMatchWarning):
        unmatched = rewrite.plan(model, "slim-neck", x, scope="model.11")
    with pytest.warns(rewrite.NoMatchWarning):
        rejected = rewrite.plan(model, "slim-neck", x, scope="head")
    assert unmatched.nothing_rewritten == (
        "nothing rewritten: 'csp-to-vovgscsp', 'conv-to-gsconv' matched nothing in model.11"
    )
    assert rejected.nothing_rewritten == (
        "nothing rewritten: every candidate was rejected (3; first: model.24.m.0 by 'conv-to-gsconv':"
        " out_channels 255 is not a multiple of 2)"
    )
    for plan in (unmatched, rejected):
        assert rewrite.render(plan, "text").splitlines()[2].split() == [
            "result",
            *plan.nothing_rewritten.split(),
        ]
    assert (
        rewrite.render(rewrite.plan(model, "slim-neck", x), "text")
        .splitlines()[2]
        .endswith("8 sites rewritten")
    )


def test_layers_rewritten_in_their_traced_graphs_keep_routing_and_hooks_through_copies():
    model = CheckedRoutedLayers().eval()
    x = torch.randn(1, 3, 16, 16)
    seen = []
    model.layers[1].register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    plan = rewrite.plan(model, "gsconv-only", x, scope="*")
    # The root runs as written (it reads each layer's f); each layer's graph is rewritten. The check against
    # the training-mode trace needs the real input: on meta the root cannot tell whether it is finite.
    assert [(site.path, site.kind) for site in plan.sites] == [
        (f"layers.{i}.conv", "graph") for i in range(3)
    ]
    assert not plan.rejected
    new = plan.apply()
    for result in (new, copy.deepcopy(new), rewrite.fold(new, x), copy.deepcopy(rewrite.fold(new, x))):
        seen.clear()
        assert [(m.i, m.f) for m in result.layers] == [(0, -1), (1, -1), (2, 0)]
        assert result(x).shape == (1, 8, 16, 16)
        assert seen == [(1, 8, 16, 16)]
