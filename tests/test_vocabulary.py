"""The op table: what belongs to each category (conv, norm, activation), what a site inherits from it, and the
roles the other stages ask about.

Each case is a pattern that a category once missed or reproduced wrongly: functional activations with their own
arguments, tensor methods, torchvision's ``FrozenBatchNorm2d`` (not a ``torch.nn`` class, so fx traced through it),
and timm's norm-with-activation and padded-conv classes.
"""

import functools

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from rule_sets import CONV_NORM_ACT, GSCONV_FITS, chain_rules
from timm.layers import BatchNormAct2d, Conv2dSame, ConvNormAct, LayerNorm2d
from torch import fx, nn
from torchvision.ops.misc import FrozenBatchNorm2d

import rewrite
from rewrite.blocks import GSConv
from rewrite.match import find_matches
from rewrite.vocabulary import (
    ACTIVATION_NAMES,
    OPS,
    IrreproducibleError,
    Role,
    carried_activation,
    category_of,
    has_role,
    is_vocabulary_module,
    reproduce_activation,
    roles,
)

# conv → norm → activation? → GSConv (activation "inherit", the default), where GSConv can take the conv's place.
GENERIC = chain_rules(CONV_NORM_ACT, where=GSCONV_FITS, name="generic")


class ConvThen(nn.Module):
    """conv → BatchNorm → an activation written as a function or tensor method in the forward."""

    def __init__(self, activation):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.activation = activation

    def forward(self, x):
        return self.activation(self.bn(self.conv(x)))


def matches(model: nn.Module, size: int = 32):
    traced = rewrite.trace(model, torch.zeros(1, model_channels(model), size, size))
    return find_matches(
        traced, GENERIC, rewrite.resolve_scope(None, traced, rewrite.resolve_stages(model, traced))
    )


def model_channels(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


# --- activations written in the forward ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "activation, expected",
    [
        (functools.partial(F.leaky_relu, negative_slope=0.2), nn.LeakyReLU(0.2)),
        (lambda x: F.leaky_relu(x, 0.2), nn.LeakyReLU(0.2)),
        (lambda x: F.gelu(x, approximate="tanh"), nn.GELU(approximate="tanh")),
        (lambda x: F.elu(x, 0.5), nn.ELU(0.5)),
        (lambda x: F.hardsigmoid(x), nn.Hardsigmoid()),
        (lambda x: x.relu(), nn.ReLU()),
        (lambda x: x.sigmoid(), nn.Sigmoid()),
    ],
    ids=[
        "leaky_relu-kwarg",
        "leaky_relu-0.2",
        "gelu-tanh",
        "elu-0.5",
        "hardsigmoid",
        "x.relu()",
        "x.sigmoid()",
    ],
)
def test_a_site_inherits_the_activation_it_ends_in_with_its_arguments(activation, expected):
    model = ConvThen(activation).eval()
    x = torch.randn(2, 8, 16, 16)

    plan = rewrite.plan(model, GENERIC, x)
    slim = plan.apply().eval()

    (site,) = plan.sites
    block = next(m for m in slim.modules() if isinstance(m, GSConv))
    for act in (block.cv1.act, block.cv2.act):
        assert type(act) is type(expected) and repr(act) == repr(expected)
    # The block computes its activation: its two halves end in it (not a silent Identity).
    assert site.kind == "graph" and not plan.rejected
    assert slim(x).shape == model(x).shape


def test_reproducing_an_activation_whose_argument_the_forward_computes_is_an_error():
    graph = fx.Graph()
    x = graph.placeholder("x")
    slope = graph.call_method("mean", (x,))
    with pytest.raises(IrreproducibleError, match="negative_slope computed by the forward"):
        reproduce_activation("call_function", F.leaky_relu, (x, slope), {})


def test_an_activation_module_is_reproduced_as_a_copy():
    act = nn.LeakyReLU(0.3)
    copied = reproduce_activation("call_module", "act", (None,), {}, act)
    assert copied is not act and copied.negative_slope == 0.3


# --- categories go by the class hierarchy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, category",
    [
        (Conv2dSame(3, 8, 3), "conv"),
        (nn.Conv1d(3, 8, 3), "conv"),
        (FrozenBatchNorm2d(8), "norm"),
        (BatchNormAct2d(8), "norm"),
        (LayerNorm2d(8), "norm"),
        (nn.SyncBatchNorm(8), "norm"),
        (nn.Hardtanh(), "activation"),
        (nn.Linear(3, 3), None),
        (nn.ConvTranspose2d(3, 8, 3), None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else str(value),
)
def test_categories_follow_the_class_hierarchy(module, category):
    assert category_of(module) == category
    assert is_vocabulary_module(module) == (category is not None)


def test_a_norm_carries_the_activation_it_applies_itself():
    assert isinstance(carried_activation(BatchNormAct2d(8, act_layer=nn.SiLU)), nn.SiLU)
    assert carried_activation(BatchNormAct2d(8, apply_act=False)) is None
    assert carried_activation(nn.BatchNorm2d(8)) is None


def test_every_vocabulary_module_stays_one_node_for_the_matcher():
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), FrozenBatchNorm2d(8), nn.ReLU()).eval()
    traced = rewrite.trace(model, torch.zeros(1, 3, 15, 15))
    (region,) = traced.regions
    calls = [node.target for node in region.graph_module.graph.nodes if node.op == "call_module"]
    assert calls == ["0", "1", "2"]
    assert [n.op for n in region.graph_module.graph.nodes] == ["placeholder", *["call_module"] * 3, "output"]


# --- real backbones ------------------------------------------------------------------------------------------------


def test_a_resnet50_with_frozen_batchnorm_matches_conv_norm_activation_and_keeps_its_eps():
    norm = functools.partial(FrozenBatchNorm2d, eps=1e-3)
    model = torchvision.models.resnet50(weights=None, norm_layer=norm).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]

    found = matches(model, size=64)

    assert len(found.matches) == len(convs) == 53 and not found.rejected
    assert all(isinstance(match.site.norm, FrozenBatchNorm2d) for match in found.matches)
    assert {match.site.norm.eps for match in found.matches} == {1e-3}
    stem = found.matches[0]
    assert (stem.path, type(stem.site.activation)) == ("conv1", nn.ReLU)
    block = rewrite.builders.build("GSConv", stem.site, {"activation": "inherit"})
    assert block.cv1.bn.eps == block.cv2.bn.eps == 1e-3


def test_a_timm_model_built_from_conv_norm_act_matches_with_the_norms_activation():
    model = timm.create_model("cs3darknet_s", pretrained=False).eval()
    blocks = [m for m in model.modules() if isinstance(m, ConvNormAct)]
    dense = [m for m in blocks if m.conv.groups == 1]

    found = matches(model, size=64)

    assert len(found.matches) == len(dense) > 0
    assert all(isinstance(match.site.norm, BatchNormAct2d) for match in found.matches)
    # The site's activation is the one BatchNormAct2d applies (SiLU here), not its dropout's Identity.
    acts = {type(m.bn.act) for m in dense}
    assert {type(match.site.activation) for match in found.matches} == acts and nn.Identity not in acts


def test_a_timm_model_plans_applies_and_runs_with_the_generic_rule():
    model = timm.create_model("lcnet_050", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)

    plan = rewrite.plan(model, GENERIC, x)
    slim = plan.apply().eval()

    assert len(plan.sites) > 0 and plan.params.after < plan.params.before
    assert slim(x).shape == model(x).shape


# --- the table ----------------------------------------------------------------------------------------------------


def test_each_spelling_of_an_op_has_one_row():
    spellings = [spelling for op in OPS for spelling in op.spellings]
    assert len(spellings) == len(set(spellings))
    assert F.relu_ in spellings and F.pixel_shuffle in spellings  # torch's own, under another name


@pytest.mark.parametrize(
    "op, target, module, channelwise",
    [
        ("call_module", "act", nn.CELU(), True),
        ("call_module", "act", nn.SELU(), True),
        ("call_module", "act", nn.ReLU6(), True),
        ("call_module", "act", nn.PReLU(8), False),  # one slope per channel
        ("call_function", F.celu, None, True),
        ("call_function", F.selu, None, True),
        ("call_function", F.hardtanh, None, True),
        ("call_function", F.relu_, None, False),  # in place: other readers of its input would see the change
        ("call_method", "sigmoid", None, True),
        ("call_method", "sigmoid_", None, False),
    ],
    ids=lambda value: (
        getattr(value, "__name__", type(value).__name__) if not isinstance(value, str) else value
    ),
)
def test_activations_computed_out_of_place_the_same_on_every_channel_are_channelwise(
    op, target, module, channelwise
):
    assert has_role(Role.ACTIVATION, op, target, module)
    assert has_role(Role.CHANNELWISE, op, target, module) == channelwise


def test_roles_follow_the_class_hierarchy_and_the_class_name():
    assert {Role.ACTIVATION, Role.CHANNELWISE, Role.IDEMPOTENT} <= roles("call_module", "a", nn.ReLU6())
    assert roles("call_module", "bn", FrozenBatchNorm2d(8)) == {Role.NORM}
    assert Role.BATCH_NORM in roles("call_module", "bn", BatchNormAct2d(8))
    assert roles("call_module", "up", nn.UpsamplingNearest2d(scale_factor=2)) == {
        Role.CHANNELWISE,
        Role.UPSAMPLING,
    }
    assert roles("call_function", len) == frozenset() and roles("placeholder", "x") == frozenset()


def test_the_builders_activation_names_are_the_tables():
    named = {op.name: op for op in OPS if op.name is not None}
    assert (
        list(ACTIVATION_NAMES)
        == list(named)
        == ["silu", "relu", "hardswish", "leaky_relu", "gelu", "identity"]
    )
    assert all(Role.ACTIVATION in op.roles for op in named.values())
    assert all(has_role(Role.ACTIVATION, "call_module", "act", make()) for make in ACTIVATION_NAMES.values())
