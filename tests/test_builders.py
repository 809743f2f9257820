"""Builders: the registry, Site facts, the GS builders (shapes, params, inherited settings) and BuildError."""

from typing import Literal, get_args

import pytest
import torch
from reference import BASE, GSCONV_ONLY, SLIM_NECK, SLIM_NECK_YOLOV5L_SHAPES
from torch import nn

from rewrite import builders
from rewrite.blocks import BN_EPS, GSConv
from rewrite.builders import Site, build, builder_options, get_builder, list_builders, register_builder
from rewrite.errors import BuildError, RuleError
from rewrite.rules import Derivation, load_rules, parse_rules
from rewrite.vocabulary import ACTIVATION_NAMES
from rewrite.zoo import create_model


def conv_site(c1=64, c2=128, k=3, s=1, **facts) -> Site:
    facts = {"groups": 1, "dilation": 1, **facts}
    return Site(
        "model.10",
        "conv-to-gsconv",
        "Conv2d",
        in_channels=c1,
        out_channels=c2,
        kernel_size=k,
        stride=s,
        **facts,
    )


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def registered():
    """Names registered by a test, removed afterwards so the global registry stays as shipped."""
    names: list[str] = []
    yield names
    for name in names:
        builders._REGISTRY.pop(name, None)


# --- registry ---


def test_the_gs_builders_are_registered():
    assert {"GSConv", "GSBottleneck", "VoVGSCSP"} <= set(list_builders())
    assert list(builder_options("GSConv")) == ["shuffle", "dw_kernel", "activation"]
    assert list(builder_options("VoVGSCSP")) == ["n", "expansion", "shuffle", "dw_kernel", "activation"]
    assert get_args(builder_options("GSConv")["shuffle"].annotation) == ("split", "interleave")


def test_get_builder_of_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="GSConv"):
        get_builder("Nope")


def test_a_builder_registered_with_the_decorator_is_usable_from_a_rule_string(registered):
    @register_builder("TestPointwise")
    def pointwise(site: Site, *, width: int = 8, bias: bool = False) -> nn.Module:
        return nn.Conv2d(site.in_channels, width, 1, bias=bias)

    registered.append("TestPointwise")
    assert get_builder("TestPointwise") is pointwise
    [rule] = parse_rules(
        '[ruleset]\nname = "mine"\n[[rule]]\nname = "pw"\nmatch.chain = ["conv"]\n'
        'replace.builder = "TestPointwise"\nreplace.width = { fact = "out_channels" }\nreplace.bias = true\n'
    ).rules
    site = conv_site(c1=4, c2=6)
    options = {
        key: v.derive(site) if isinstance(v, Derivation) else v for key, v in rule.replace.options.items()
    }
    block = build(rule.replace.builder, site, options)
    assert (block.in_channels, block.out_channels, block.bias is not None) == (4, 6, True)


def test_names_are_unique_unless_overridden(registered):
    registered.append("Twice")
    register_builder("Twice")(lambda site: nn.Identity())
    with pytest.raises(ValueError, match="already registered; pass override=True"):
        register_builder("Twice")(lambda site: nn.Identity())
    replacement = register_builder("Twice", override=True)(lambda site: nn.ReLU())
    assert get_builder("Twice") is replacement
    assert "twice" not in list_builders()  # names are case-sensitive


def bad_varargs(site, **options):
    return nn.Identity()


def bad_positional_only(site, width, /):
    return nn.Identity()


def bad_no_site(*, width=1):
    return nn.Identity()


@pytest.mark.parametrize("function", [bad_varargs, bad_positional_only, bad_no_site])
def test_builders_must_take_the_site_then_named_options(function):
    with pytest.raises(TypeError, match="builder 'Bad'"):
        register_builder("Bad")(function)
    assert "Bad" not in list_builders()


def test_the_decorator_needs_a_name():
    with pytest.raises(TypeError, match='@register_builder\\("Name"\\)'):
        register_builder(bad_varargs)


# --- Site ---


def test_site_facts_are_the_fact_types_and_square_values_are_ints():
    site = Site(
        "m",
        "r",
        "Conv2d",
        in_channels=8,
        out_channels=8,
        kernel_size=(3, 3),
        stride=(2, 1),
        groups=8,
        dilation=(1, 1),
        padding=(1, 1),
        bias=False,
        activation=nn.ReLU(),
    )
    facts = site.facts()
    assert list(facts) == list(Site.FACT_TYPES)
    assert (facts["kernel_size"], facts["stride"], facts["dilation"], facts["padding"]) == (3, (2, 1), 1, 1)
    assert (facts["depthwise"], facts["activation"], facts["module_type"]) == (True, "ReLU", "Conv2d")
    assert Site("m", "r", "C3").facts()["depthwise"] is None


# --- the GS builders ---


def test_gsconv_keeps_channels_kernel_and_stride():
    block = build("GSConv", conv_site(64, 128, k=3, s=2), {})
    assert isinstance(block, GSConv)
    assert block(torch.randn(1, 64, 32, 32)).shape == (1, 128, 16, 16)
    # cv1: dense 3x3 to half the channels; cv2: depthwise 5x5; each followed by BatchNorm (2 params a channel)
    assert params(block) == (64 * 64 * 9 + 2 * 64) + (64 * 25 + 2 * 64)
    assert block.cv1.conv.stride == (2, 2) and block.cv2.conv.kernel_size == (5, 5)


def test_gsconv_options_reach_the_block():
    block = build("GSConv", conv_site(8, 16, k=1), {"shuffle": "interleave", "dw_kernel": 3})
    assert block.shuffle == "interleave"
    assert block.cv2.conv.kernel_size == (3, 3)


def test_inherit_copies_the_sites_activation_and_identity_when_there_is_none():
    relu = nn.ReLU(inplace=True)
    block = build("GSConv", conv_site(activation=relu), {"activation": "inherit"})
    assert isinstance(block.cv1.act, nn.ReLU) and block.cv1.act is not relu and block.cv1.act.inplace
    assert block.cv1.act is not block.cv2.act
    block = build("GSConv", conv_site(), {"activation": "inherit"})
    assert isinstance(block.cv1.act, nn.Identity)


@pytest.mark.parametrize("name", [name for name in get_args(builders.ActivationName) if name != "inherit"])
def test_named_activations(name):
    block = build("GSConv", conv_site(activation=nn.SiLU()), {"activation": name})
    assert type(block.cv1.act) is type(ACTIVATION_NAMES[name]())
    assert set(get_args(builders.ActivationName)) == {"inherit", *ACTIVATION_NAMES}


def test_an_unknown_activation_name_is_refused_with_the_op_tables_names():
    with pytest.raises(RuleError) as refused:
        parse_rules(
            '[ruleset]\nname = "mine"\n[[rule]]\nname = "gs"\nmatch.chain = ["conv"]\n'
            'replace.builder = "GSConv"\nreplace.activation = "swish"\n'
        )
    names = ", ".join(repr(name) for name in ("inherit", *ACTIVATION_NAMES))
    assert f"replace.activation: GSConv expects one of {names}, got 'swish'" in str(refused.value)


def test_batchnorm_settings_come_from_the_matched_norm_else_the_block_defaults():
    norm = nn.BatchNorm2d(128, eps=1e-4, momentum=0.2)
    block = build("VoVGSCSP", conv_site(128, 128, k=None, norm=norm), {"n": 2})
    assert {(bn.eps, bn.momentum) for bn in block.modules() if isinstance(bn, nn.BatchNorm2d)} == {
        (1e-4, 0.2)
    }
    block = build("GSConv", conv_site(norm=nn.GroupNorm(4, 128)), {})
    assert block.cv1.bn.eps == 1e-5  # GroupNorm has an eps, no momentum
    assert build("GSConv", conv_site(), {}).cv1.bn.eps == BN_EPS


def test_the_block_is_placed_on_the_sites_device_and_dtype():
    block = build("GSConv", conv_site(dtype=torch.float64, device=torch.device("meta")), {})
    assert {(p.dtype, p.device.type) for p in block.parameters()} == {(torch.float64, "meta")}


def test_gsbottleneck_and_vovgscsp_keep_the_shape():
    x = torch.randn(1, 32, 8, 8)
    bottleneck = build("GSBottleneck", conv_site(32, 32, k=None), {"kernel_size": 1})
    assert bottleneck(x).shape == x.shape
    assert bottleneck.conv_lighting[1].cv1.conv.kernel_size == (1, 1)
    csp = build("VoVGSCSP", conv_site(32, 64, k=None), {"n": 3, "expansion": 0.25})
    assert csp(x).shape == (1, 64, 8, 8)
    assert len(csp.gsb) == 3 and csp.cv1.conv.out_channels == 16


def yolov5_neck_sites(model: nn.Module) -> list[Site]:
    """The sites slim-neck finds in a YOLOv5 neck (tests/reference.py), made from its modules like the matcher."""
    sites = []
    for index in (10, 14, 18, 21):
        layer = model.model[index]
        conv = layer.conv
        sites.append(
            Site(
                f"model.{index}",
                "conv-to-gsconv",
                "Conv2d",
                in_channels=conv.in_channels,
                out_channels=conv.out_channels,
                kernel_size=conv.kernel_size,
                stride=conv.stride,
                groups=conv.groups,
                dilation=conv.dilation,
                activation=layer.act,
                norm=layer.bn,
                device=conv.weight.device,
            )
        )
    for index in (13, 17, 20, 23):
        layer = model.model[index]
        sites.append(
            Site(
                f"model.{index}",
                "csp-to-vovgscsp",
                "C3",
                in_channels=layer.cv1.conv.in_channels,
                out_channels=layer.cv3.conv.out_channels,
                stride=1,
                activation=layer.cv3.act,
                norm=layer.cv1.bn,
                counts={"Bottleneck": len(layer.m)},
                device=layer.cv1.conv.weight.device,
            )
        )
    return sites


def build_with_slim_neck(site: Site) -> nn.Module:
    rule = {rule.name: rule for rule in load_rules("slim-neck").rules}[site.rule]
    options = {k: v.derive(site) if isinstance(v, Derivation) else v for k, v in rule.replace.options.items()}
    return build(rule.replace.builder, site, options)


@pytest.mark.parametrize(
    # params of the base model minus those of GSConv-only, and of slim-neck
    "name, gsconv_saving, slim_neck_saving",
    [
        (name, BASE[name][0] - GSCONV_ONLY[name][0], BASE[name][0] - SLIM_NECK[name][0])
        for name in ("yolov5n", "yolov5s")
    ],
)
def test_slim_neck_builders_reproduce_the_reference_parameter_savings(name, gsconv_saving, slim_neck_saving):
    with torch.device("meta"):
        model = create_model(name)
    savings = {}
    for site in yolov5_neck_sites(model):
        old = model.get_submodule(site.path)
        savings[site.path] = params(old) - params(build_with_slim_neck(site))
    assert sum(savings[f"model.{i}"] for i in (10, 14, 18, 21)) == gsconv_saving
    assert sum(savings.values()) == slim_neck_saving


def test_slim_neck_blocks_carry_the_reference_state_dict_shapes():
    with torch.device("meta"):
        model = create_model("yolov5l")
    blocks = {site.path: build_with_slim_neck(site) for site in yolov5_neck_sites(model)}
    for key, shape in SLIM_NECK_YOLOV5L_SHAPES.items():  # model.{i}.{key in block i}
        _, index, key_in_block = key.split(".", 2)
        assert blocks[f"model.{index}"].state_dict()[key_in_block].shape == shape
    assert len(blocks["model.13"].gsb) == len(model.model[13].m) == 3
    assert all(p.device.type == "meta" for block in blocks.values() for p in block.parameters())


# --- BuildError ---


@pytest.mark.parametrize(
    "builder, site, fragment",
    [
        ("GSConv", conv_site(64, 255), "out_channels must be even"),
        ("GSConv", conv_site(dilation=2), "add where.dilation = 1"),
        (
            "GSConv",
            Site("model.13", "csp", "C3", in_channels=8, out_channels=8, stride=1),
            "kernel_size unknown for C3",
        ),
        ("VoVGSCSP", conv_site(64, 64, s=2), "VoVGSCSP keeps the spatial size, but the site has stride 2"),
    ],
)
def test_a_builder_failure_is_a_one_line_build_error_naming_site_and_rule(builder, site, fragment):
    with pytest.raises(BuildError) as caught:
        build(builder, site, {})
    message = str(caught.value)
    assert message.startswith(f"site {site.path!r}: rule {site.rule!r}: cannot build {builder}: ")
    assert fragment in message and "\n" not in message


def test_a_builder_that_returns_no_module_is_a_build_error(registered):
    registered.append("Broken")
    register_builder("Broken")(lambda site: "not a module")
    with pytest.raises(BuildError, match="returned str, not an nn.Module"):
        build("Broken", conv_site(), {})


def test_option_annotations_fall_back_to_the_default_type(registered):
    registered.append("Untyped")

    @register_builder("Untyped")
    def untyped(site, size=3, name=None, mode: "Literal['x']" = "x"):
        return nn.Identity()

    options = builder_options("Untyped")
    assert options["size"].annotation is int
    assert options["mode"].annotation == Literal["x"]
    assert str(options["name"].annotation) == "typing.Any"


# --- the ranges builders declare for their options (rewrite.builders.Valid) ---


def test_the_gs_builders_declare_their_ranges():
    from rewrite.builders import check_option

    assert check_option("GSConv", "dw_kernel", 5) is None
    assert check_option("GSConv", "dw_kernel", 6) == "GSConv expects an odd integer >= 1, got 6"
    assert (
        check_option("GSBottleneck", "kernel_size", -1) == "GSBottleneck expects an odd integer >= 1, got -1"
    )
    assert check_option("VoVGSCSP", "n", 0) == "VoVGSCSP expects an integer >= 1, got 0"
    assert check_option("VoVGSCSP", "expansion", 0.25) is None
    assert check_option("VoVGSCSP", "shuffle", "split") is None  # no declared range: nothing to say
    # The annotation the rule loader checks types against stays the plain type.
    assert builder_options("VoVGSCSP")["n"].annotation is int
    assert builder_options("GSBottleneck")["expansion"].annotation is float


def test_a_custom_builder_declares_a_range_with_annotated():
    from typing import Annotated

    from rewrite.builders import Valid, check_option
    from rewrite.errors import RuleError
    from rewrite.rules import parse_rules

    @register_builder("Scaled")
    def scaled(site: Site, *, scale: Annotated[float, Valid(gt=0, le=4)] = 1.0) -> nn.Module:
        return nn.Identity()

    assert check_option("Scaled", "scale", 4) is None
    assert check_option("Scaled", "scale", 4.5) == "Scaled expects a number > 0 and <= 4, got 4.5"
    text = '[ruleset]\nname = "t"\n[[rule]]\nname = "r"\nmatch.chain = ["conv"]\nreplace.builder = "Scaled"\n'
    with pytest.raises(
        RuleError, match=r"^x.toml: rule 'r': replace.scale: Scaled expects a number > 0 and <= 4, got 9$"
    ):
        parse_rules(text + "replace.scale = 9\n", "x.toml")


def test_a_derived_value_outside_the_range_is_a_build_error():
    site = Site("model.3", "r", "Conv2d", in_channels=8, out_channels=8, kernel_size=4, stride=1)
    dw_kernel = Derivation("fact", "kernel_size").derive(site)
    with pytest.raises(BuildError) as caught:
        build("GSConv", site, {"dw_kernel": dw_kernel})
    assert str(caught.value) == (
        "site 'model.3': rule 'r': cannot build GSConv: GSConv expects an odd integer >= 1, got 4 (replace.dw_kernel)"
    )
