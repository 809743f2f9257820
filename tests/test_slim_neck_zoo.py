"""The built-in rule sets on the zoo's YOLOv5 models reproduce REFERENCE.md §3 and §3b to the unit."""

import hashlib

import pytest
import torch

import rewrite
from rewrite.zoo import create_model

# REFERENCE.md §3: params / FLOPs for base, GSConv-only and slim-neck (nc=80, 1x3x640x640, eval, BN not fused).
FIGURES = {
    "yolov5n": ((1_872_157, 4_468_121_600), (1_764_317, 4_331_622_400), (1_669_693, 4_144_947_200)),
    "yolov5s": ((7_235_389, 16_433_561_600), (6_794_429, 15_872_204_800), (6_400_381, 15_079_424_000)),
    "yolov5m": ((21_190_557, 48_872_448_000), (20_191_197, 47_597_875_200), (18_394_653, 43_961_241_600)),
    "yolov5l": ((46_563_709, 108_993_740_800), (44_780_669, 106_717_593_600), (39_958_781, 96_927_744_000)),
    "yolov5x": ((86_749_405, 205_448_192_000), (83_957_405, 201_882_112_000), (73_872_925, 181_371_392_000)),
}
# REFERENCE.md §3b: slim-neck state-dict key counts and signatures.
SLIM_NECK_SIGNATURES = {
    "yolov5n": (445, "e7e2a8bb2002dd8e"),
    "yolov5s": (445, "1a307c32d66e154c"),
    "yolov5l": (853, "29213b68ff1fb4e8"),
}
NECK_CONVS = ["model.10", "model.14", "model.18", "model.21"]
NECK_CSPS = ["model.13", "model.17", "model.20", "model.23"]


def signature(model: torch.nn.Module) -> str:
    text = "\n".join(f"{key} {tuple(t.shape)}" for key, t in sorted(model.state_dict().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name).eval()


META_INPUT = torch.zeros(1, 3, 640, 640, device="meta")


@pytest.mark.parametrize("name", list(FIGURES))
@pytest.mark.parametrize("rules, column", [("gsconv-only", 1), ("slim-neck", 2)])
def test_rule_set_reproduces_reference_figures(name, rules, column):
    base, expected = FIGURES[name][0], FIGURES[name][column]
    plan = rewrite.plan(meta_model(name), rules, META_INPUT)
    assert (plan.params.before, plan.flops.before) == base
    assert (plan.params.after, plan.flops.after) == expected
    assert plan.shape_check.passed, plan.shape_check.detail
    # The per-site figures add up to the whole-model difference.
    assert sum(s.params.change for s in plan.sites) == plan.params.change
    assert sum(s.flops.change for s in plan.sites) == plan.flops.change


@pytest.mark.parametrize("name", list(SLIM_NECK_SIGNATURES))
def test_slim_neck_state_dict_signature(name):
    keys, expected = SLIM_NECK_SIGNATURES[name]
    rewritten = rewrite.apply(meta_model(name), "slim-neck", META_INPUT)
    assert len(rewritten.state_dict()) == keys
    assert signature(rewritten) == expected


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
