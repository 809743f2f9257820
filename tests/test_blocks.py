"""The GS blocks: shapes, exact parameter counts, both channel shuffles, names, and the reference figures."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.fx
from reference import GSCONV_ONLY, SLIM_NECK, SLIM_NECK_STATE_DICTS, state_dict_signature
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rewrite.blocks import ConvBNAct, DepthwiseConv2d, GSBottleneck, GSConv, VoVGSCSP, channel_shuffle
from rewrite.zoo import create_model


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def channel_values(x: torch.Tensor) -> list[float]:
    """The value at one pixel of sample 0, channel by channel (the inputs below are constant per channel)."""
    return x[0, :, 0, 0].tolist()


# Closed forms. A conv-BN pair has c_in/g * c_out * k^2 weights and 2 * c_out BatchNorm affine parameters.
# GSConv with h = c2/2: cv1 = c1/g * h * k^2 + 2h, cv2 (depthwise) = h * dw^2 + 2h.
def gsconv_params(c1: int, c2: int, k: int = 1, g: int = 1, dw: int = 5) -> int:
    h = c2 // 2
    return h * (c1 * k * k // g + dw * dw + 4)


# GSBottleneck with m = int(c2 * e): GSConv(c1, m, 1) + GSConv(m, c2, k) + 1x1 shortcut conv-BN (c1 -> c2).
def gsbottleneck_params(c1: int, c2: int, k: int = 3, e: float = 0.5, dw: int = 5) -> int:
    m = int(c2 * e)
    return m // 2 * (c1 + dw * dw + 4) + c2 // 2 * (m * k * k + dw * dw + 4) + c1 * c2 + 2 * c2


# VoVGSCSP with h = int(c2 * e): cv1, cv2 = 2 (c1 h + 2h); each GSBottleneck(h, h, k=3, e=1) expands to
# h/2 (h + dw^2 + 4) + h/2 (9h + dw^2 + 4) + h^2 + 2h = 6h^2 + h dw^2 + 6h; cv3 = 2h c2 + 2 c2.
def vovgscsp_params(c1: int, c2: int, n: int = 1, e: float = 0.5, dw: int = 5) -> int:
    h = int(c2 * e)
    return 2 * (c1 * h + 2 * h) + n * (6 * h * h + h * dw * dw + 6 * h) + 2 * h * c2 + 2 * c2


# ------------------------------------------------------------------------------------------ channel shuffle


def test_split_shuffle_takes_even_then_odd_channels() -> None:
    x = torch.arange(8.0).view(1, 8, 1, 1).expand(2, 8, 3, 3)
    assert channel_values(channel_shuffle(x, "split")) == [0, 2, 4, 6, 1, 3, 5, 7]
    assert channel_values(channel_shuffle(x)) == [0, 2, 4, 6, 1, 3, 5, 7]  # the default
    x12 = torch.arange(12.0).view(1, 12, 1, 1)
    assert channel_values(channel_shuffle(x12, "split")) == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]


def test_interleave_shuffle_alternates_the_two_halves() -> None:
    x = torch.arange(8.0).view(1, 8, 1, 1).expand(2, 8, 3, 3)
    assert channel_values(channel_shuffle(x, "interleave")) == [0, 4, 1, 5, 2, 6, 3, 7]
    x12 = torch.arange(12.0).view(1, 12, 1, 1)
    assert channel_values(channel_shuffle(x12, "interleave")) == [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]


def test_shuffle_keeps_each_sample_and_pixel_apart() -> None:
    x = torch.randn(3, 8, 4, 5)
    for variant in ("split", "interleave"):
        y = channel_shuffle(x, variant)
        for sample in range(3):
            torch.testing.assert_close(y[sample], channel_shuffle(x[sample : sample + 1], variant)[0])


def test_unknown_shuffle_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'zigzag'.*split, interleave"):
        channel_shuffle(torch.zeros(1, 4, 1, 1), "zigzag")
    with pytest.raises(ValueError, match="split, interleave"):
        GSConv(4, 8, shuffle="zigzag")


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        # cv1 gives channels 1, 2, 3, 4, the depthwise cv2 ten times those: x2 = [1, 2, 3, 4, 10, 20, 30, 40].
        ("split", [1, 3, 10, 30, 2, 4, 20, 40]),
        ("interleave", [1, 10, 2, 20, 3, 30, 4, 40]),
    ],
)
def test_gsconv_output_is_the_shuffled_concat_of_both_branches(variant: str, expected: list[int]) -> None:
    gsconv = GSConv(4, 8, act=False, shuffle=variant, bn_eps=0.0).eval()  # eval BN with eps 0: identity
    with torch.no_grad():
        gsconv.cv1.conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        gsconv.cv1.bn.bias.fill_(1.0)  # so that channel 0 is not 0 in both branches
        gsconv.cv2.conv.weight.zero_()
        gsconv.cv2.conv.weight[:, :, 2, 2] = 10.0  # centre tap of the 5x5 depthwise kernel
    x = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 6, 6)
    assert channel_values(gsconv(x)) == expected


# ------------------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 64, "out_channels": 128},
        {"in_channels": 64, "out_channels": 128, "kernel_size": 3, "stride": 2},
        {"in_channels": 64, "out_channels": 128, "kernel_size": 3, "groups": 4},
        {"in_channels": 32, "out_channels": 64, "dw_kernel": 3},
        {"in_channels": 3, "out_channels": 32, "kernel_size": 3, "stride": 2, "dw_kernel": 7},
    ],
)
def test_gsconv_param_count(kwargs: dict) -> None:
    expected = gsconv_params(
        kwargs["in_channels"],
        kwargs["out_channels"],
        kwargs.get("kernel_size", 1),
        kwargs.get("groups", 1),
        kwargs.get("dw_kernel", 5),
    )
    assert n_params(GSConv(**kwargs)) == expected


@pytest.mark.parametrize(
    ("c1", "c2", "k", "e", "dw"),
    [(64, 64, 3, 0.5, 5), (32, 64, 3, 1.0, 5), (64, 128, 5, 0.5, 3), (128, 128, 1, 0.25, 5)],
)
def test_gsbottleneck_param_count(c1: int, c2: int, k: int, e: float, dw: int) -> None:
    block = GSBottleneck(c1, c2, k, expansion=e, dw_kernel=dw)
    assert n_params(block) == gsbottleneck_params(c1, c2, k, e, dw)


@pytest.mark.parametrize(
    ("c1", "c2", "n", "e", "dw"),
    [(128, 128, 1, 0.5, 5), (256, 128, 3, 0.5, 5), (64, 64, 2, 0.5, 3), (128, 128, 1, 0.25, 5)],
)
def test_vovgscsp_param_count(c1: int, c2: int, n: int, e: float, dw: int) -> None:
    block = VoVGSCSP(c1, c2, n, expansion=e, dw_kernel=dw)
    assert n_params(block) == vovgscsp_params(c1, c2, n, e, dw)


def test_odd_out_channels_are_rejected_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"out_channels must be even.*depthwise.*got 7"):
        GSConv(4, 7)


# ---------------------------------------------------------------------------------------- shapes, gradients


@pytest.mark.parametrize(
    ("block", "in_channels", "out_channels", "scale"),
    [
        (GSConv(16, 32), 16, 32, 1),
        (GSConv(16, 32, 3, 2), 16, 32, 2),
        (GSConv(16, 32, 3, 2, groups=2, dw_kernel=3, shuffle="interleave"), 16, 32, 2),
        (GSBottleneck(32, 32), 32, 32, 1),
        (GSBottleneck(16, 48, 5, expansion=1.0), 16, 48, 1),
        (VoVGSCSP(32, 64, 2), 32, 64, 1),
        (VoVGSCSP(64, 32, 1, expansion=0.25, dw_kernel=3), 64, 32, 1),
    ],
    ids=[
        "GSConv",
        "GSConv-s2",
        "GSConv-s2-g2-dw3",
        "GSBottleneck",
        "GSBottleneck-k5",
        "VoVGSCSP",
        "VoVGSCSP-e.25",
    ],
)
def test_forward_shape(block: nn.Module, in_channels: int, out_channels: int, scale: int) -> None:
    out = block(torch.randn(2, in_channels, 12, 10))
    assert out.shape == (2, out_channels, 12 // scale, 10 // scale)


@pytest.mark.parametrize(
    ("block", "in_channels"),
    [
        (GSConv(8, 16, 3, 2, groups=2), 8),
        (GSBottleneck(16, 16), 16),
        (VoVGSCSP(16, 32, 2, shuffle="interleave"), 16),
    ],
    ids=["GSConv", "GSBottleneck", "VoVGSCSP"],
)
def test_every_parameter_gets_a_gradient(block: nn.Module, in_channels: int) -> None:
    out = block(torch.randn(2, in_channels, 8, 8))
    # Random weights, because the plain sum of a training-mode BatchNorm output has zero gradient.
    (out * torch.randn_like(out)).sum().backward()
    starved = [name for name, p in block.named_parameters() if p.grad is None or not p.grad.any()]
    assert starved == []


@pytest.mark.parametrize(
    ("block", "in_channels"),
    [(GSConv(8, 16, shuffle="interleave"), 8), (GSConv(8, 16, 3, 2), 8), (VoVGSCSP(16, 16, 2), 16)],
    ids=["GSConv-interleave", "GSConv-split", "VoVGSCSP"],
)
def test_blocks_trace_with_fx(block: nn.Module, in_channels: int) -> None:
    block.eval()
    x = torch.randn(1, in_channels, 8, 8)
    torch.testing.assert_close(torch.fx.symbolic_trace(block)(x), block(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------- wiring, options, names


def test_gsbottleneck_adds_the_lightweight_branch_and_the_shortcut() -> None:
    block = GSBottleneck(16, 16).eval()
    x = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(block(x), block.conv_lighting(x) + block.shortcut(x))
    first, second = block.conv_lighting
    assert isinstance(first.cv1.act, nn.SiLU) and isinstance(second.cv1.act, nn.Identity)
    assert isinstance(block.shortcut.act, nn.Identity)


def test_vovgscsp_concatenates_the_cv2_branch_first() -> None:
    block = VoVGSCSP(16, 32, 2).eval()
    x = torch.randn(1, 16, 8, 8)
    expected = block.cv3(torch.cat((block.cv2(x), block.gsb(block.cv1(x))), 1))
    torch.testing.assert_close(block(x), expected)


def test_options_reach_every_gsconv() -> None:
    block = VoVGSCSP(32, 32, 2, shuffle="interleave", dw_kernel=3)
    gsconvs = [m for m in block.modules() if isinstance(m, GSConv)]
    assert len(gsconvs) == 4
    assert {m.shuffle for m in gsconvs} == {"interleave"}
    assert {m.cv2.conv.kernel_size for m in gsconvs} == {(3, 3)}


def test_activation_options() -> None:
    assert isinstance(GSConv(4, 8).cv1.act, nn.SiLU)
    assert isinstance(GSConv(4, 8, act=False).cv2.act, nn.Identity)
    assert isinstance(GSConv(4, 8, act=None).cv1.act, nn.Identity)
    prelu = nn.PReLU()
    gsconv = GSConv(4, 8, act=prelu)
    # Each place gets its own copy, so a learnable activation is not shared between layers.
    assert isinstance(gsconv.cv1.act, nn.PReLU) and isinstance(gsconv.cv2.act, nn.PReLU)
    assert len({id(prelu), id(gsconv.cv1.act), id(gsconv.cv2.act)}) == 3
    block = VoVGSCSP(16, 16, 1, act=nn.ReLU())
    places = (block.cv1, block.cv2, block.cv3, block.gsb[0].conv_lighting[0].cv1)
    assert {type(m.act) for m in places} == {nn.ReLU}
    with pytest.raises(TypeError, match="act must be"):
        GSConv(4, 8, act="relu")


@pytest.mark.parametrize(("block", "shape"), [(GSBottleneck, ("kernel_size", 3)), (VoVGSCSP, ("n", 1))])
def test_gs_stage_blocks_show_their_keywords_as_written_out(block: type[nn.Module], shape: tuple) -> None:
    # The two blocks' keyword-only parameters are written once (a dataclass): help() and inspect must still
    # list them, and a misspelt one must fail in the block's name, as with parameters written out.
    parameters = inspect.signature(block).parameters
    keywords = {
        "expansion": 0.5,
        "act": True,
        "dw_kernel": 5,
        "shuffle": "split",
        "bn_eps": 1e-3,
        "bn_momentum": 0.03,
    }
    assert [(name, p.default) for name, p in parameters.items()] == [
        ("in_channels", inspect.Parameter.empty),
        ("out_channels", inspect.Parameter.empty),
        shape,
        *keywords.items(),
    ]
    assert {parameters[name].kind for name in keywords} == {inspect.Parameter.KEYWORD_ONLY}
    with pytest.raises(
        TypeError, match=rf"^{block.__name__}.__init__\(\) got an unexpected keyword argument 'expand'"
    ):
        block(8, 8, expand=0.5)


def test_batchnorm_defaults_are_the_reference_ones_and_configurable() -> None:
    default = [m for m in VoVGSCSP(16, 16, 2).modules() if isinstance(m, nn.BatchNorm2d)]
    assert default and {(m.eps, m.momentum) for m in default} == {(1e-3, 0.03)}
    custom = VoVGSCSP(16, 16, 2, bn_eps=1e-5, bn_momentum=0.1).modules()
    assert {(m.eps, m.momentum) for m in custom if isinstance(m, nn.BatchNorm2d)} == {(1e-5, 0.1)}


def test_state_dict_keys_are_the_reference_ones() -> None:
    conv_bn = [
        "bn.bias",
        "bn.num_batches_tracked",
        "bn.running_mean",
        "bn.running_var",
        "bn.weight",
        "conv.weight",
    ]
    assert sorted(ConvBNAct(4, 8).state_dict()) == conv_bn
    assert sorted(GSConv(4, 8).state_dict()) == [f"{cv}.{key}" for cv in ("cv1", "cv2") for key in conv_bn]
    keys = set(VoVGSCSP(16, 16, 2).state_dict())
    assert {key.split(".")[0] for key in keys} == {"cv1", "cv2", "gsb", "cv3"}
    assert "gsb.1.conv_lighting.1.cv2.conv.weight" in keys
    assert "gsb.0.shortcut.bn.running_var" in keys
    assert not any(key.startswith("res.") for key in keys)  # the reference's unused conv is not built


# ------------------------------------------------------------------ the reference figures (tests/reference.py)


def slim_neck(model: nn.Module, *, csp: bool) -> nn.Module:
    """YOLOv5 with its neck Convs (10, 14, 18, 21) as GSConv and, when ``csp``, its neck C3s as VoVGSCSP."""
    layers = model.model
    for i in (10, 14, 18, 21):
        conv = layers[i].conv
        new = GSConv(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0])
        new.i, new.f = layers[i].i, layers[i].f
        layers[i] = new
    for i in (13, 17, 20, 23) if csp else ():
        c3 = layers[i]
        new = VoVGSCSP(c3.cv1.conv.in_channels, c3.cv3.conv.out_channels, len(c3.m))
        new.i, new.f = c3.i, c3.f
        layers[i] = new
    return model


@pytest.mark.parametrize(
    ("name", "csp"),
    [("yolov5n", False), ("yolov5n", True), ("yolov5s", True), ("yolov5l", False), ("yolov5l", True)],
)
def test_slim_neck_yolov5_matches_the_reference(name, csp) -> None:
    with torch.device("meta"):
        model = slim_neck(create_model(name), csp=csp).eval()
        x = torch.empty(1, 3, 640, 640)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert (n_params(model), counter.get_total_flops()) == (SLIM_NECK if csp else GSCONV_ONLY)[name]
    if csp:
        assert (len(model.state_dict()), state_dict_signature(model)) == SLIM_NECK_STATE_DICTS[name]


# ------------------------------------------------------------------------- the depthwise conv's training step


def test_depthwise_conv_trains_to_the_same_values_and_gradients_as_conv2d() -> None:
    torch.manual_seed(0)
    fast = DepthwiseConv2d(16, 16, 5, padding=2, groups=16)
    plain = nn.Conv2d(16, 16, 5, padding=2, groups=16)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(4, 16, 24, 24, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    out_fast, out_plain = fast(x), plain(y)
    assert out_fast.is_contiguous(memory_format=torch.channels_last)  # where gradients flow on a CPU
    torch.testing.assert_close(out_fast, out_plain)
    grad = torch.randn_like(out_plain)
    out_fast.backward(grad)
    out_plain.backward(grad)
    torch.testing.assert_close(x.grad, y.grad)
    # a sum over 2,304 products per weight, added up in another order: float32 rounding apart
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # inference: Conv2d as it is
        assert fast(y).is_contiguous()


def test_gsconv_depthwise_branch_is_one_conv_call_to_plain_fx() -> None:
    gsconv = GSConv(8, 16)
    assert type(gsconv.cv2.conv) is DepthwiseConv2d and type(gsconv.cv1.conv) is nn.Conv2d
    calls = [node.target for node in torch.fx.symbolic_trace(gsconv).graph.nodes if node.op == "call_module"]
    assert "cv2.conv" in calls
