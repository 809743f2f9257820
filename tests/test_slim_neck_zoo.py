"""The built-in rule sets on the zoo's YOLOv5 models reproduce the reference figures (tests/reference.py) to the
unit."""

import pytest
import torch
from reference import BASE, BY_RULE_SET, SLIM_NECK_STATE_DICTS, state_dict_signature

import rewrite
from rewrite.planner import BlockSummary
from rewrite.zoo import create_model

NECK_CONVS = ["model.10", "model.14", "model.18", "model.21"]
NECK_CSPS = ["model.13", "model.17", "model.20", "model.23"]


def meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name).eval()


META_INPUT = torch.zeros(1, 3, 640, 640, device="meta")


@pytest.mark.parametrize("name", list(BASE))
@pytest.mark.parametrize("rules", ["gsconv-only", "slim-neck"])
def test_rule_set_reproduces_reference_figures(name, rules):
    base, expected = BASE[name], BY_RULE_SET[rules][name]
    plan = rewrite.plan(meta_model(name), rules, META_INPUT)
    assert (plan.params.before, plan.flops.before) == base
    assert (plan.params.after, plan.flops.after) == expected
    assert plan.shape_check.passed, plan.shape_check.detail
    # The per-site figures add up to the whole-model difference.
    assert sum(s.params.change for s in plan.sites) == plan.params.change
    assert sum(s.flops.change for s in plan.sites) == plan.flops.change


@pytest.mark.parametrize("name", list(SLIM_NECK_STATE_DICTS))
def test_slim_neck_state_dict_signature(name):
    keys, expected = SLIM_NECK_STATE_DICTS[name]
    rewritten = rewrite.apply(meta_model(name), "slim-neck", META_INPUT)
    assert len(rewritten.state_dict()) == keys
    assert state_dict_signature(rewritten) == expected


def test_slim_neck_sites_on_yolov5l():
    plan = rewrite.plan(meta_model("yolov5l"), "slim-neck", META_INPUT)
    by_path = {site.path: site for site in plan.sites}
    assert sorted(by_path, key=lambda p: int(p.split(".")[1])) == sorted(
        NECK_CONVS + NECK_CSPS, key=lambda p: int(p.split(".")[1])
    )
    assert all(by_path[p].after.startswith("GSConv(") for p in NECK_CONVS)
    assert all(by_path[p].after.startswith("VoVGSCSP(") for p in NECK_CSPS)
    assert by_path["model.10"].before == "Conv(1024→512, k1, s1)"
    assert by_path["model.10"].after == "GSConv(1024→512, k1, s1)"
    assert by_path["model.10"].replaced == BlockSummary("Conv", 1024, 512, stride=1, kernel_size=1)
    assert by_path["model.13"].replaced == BlockSummary("C3", 1024, 512, stride=1)  # no kernel for a block
    assert by_path["model.13"].replacement == BlockSummary("VoVGSCSP", 1024, 512, stride=1, n=3)
    assert {site.stage for site in plan.sites} == {"neck"}
    assert {site.kind for site in plan.sites} == {"module"}


def test_slim_neck_keeps_backbone_head_and_the_users_model():
    torch.manual_seed(0)
    model = create_model("yolov5n").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 3, 128, 128)
    reference_out = model(x)[0]

    rewritten = rewrite.apply(model, "slim-neck", x)

    # The user's model is untouched: same objects, bit-identical state.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.model[10]).__name__ == "Conv"
    assert torch.equal(model(x)[0], reference_out)
    # The rewritten copy keeps the user's class and its routing attributes.
    assert type(rewritten) is type(model)
    new_state = rewritten.state_dict()
    for key, value in before.items():
        layer = int(key.split(".")[1])
        if layer < 10 or layer == 24:  # backbone and detection head
            assert torch.equal(new_state[key], value), key
    for path in NECK_CONVS + NECK_CSPS:
        old, new = model.get_submodule(path), rewritten.get_submodule(path)
        assert (new.i, new.f, new.type) == (old.i, old.f, old.type)
    assert type(rewritten.model[10]).__name__ == "GSConv"
    assert type(rewritten.model[13]).__name__ == "VoVGSCSP"
    assert not rewritten.training
    # And it runs: eval output as before, train output the raw maps, gradients flow into the new blocks.
    assert rewritten(x)[0].shape == reference_out.shape
    rewritten.train()
    raw = rewritten(x)
    sum(r.sum() for r in raw).backward()
    assert rewritten.model[13].cv1.conv.weight.grad is not None
