"""rewrite.fold: BatchNorms and channel shuffles folded away, the same outputs, the input model untouched; and each of
its passes on its own."""

import copy
import operator

import pytest
import torch
from torch import fx, nn

import rewrite
from rewrite.blocks import GSConv, VoVGSCSP, channel_shuffle
from rewrite.fold import (
    channel_order,
    drop_no_ops,
    fold_batch_norms,
    fold_channel_orders,
    lower_channel_orders,
)
from rewrite.zoo import create_model

X = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def with_batch_norm_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh BatchNorms fold to almost nothing: give them statistics and affine weights like trained ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


def relative_error(got, expected) -> float:
    """Per output tensor max|got - expected| / max|expected|; the largest over outputs."""
    pairs = zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected), strict=True)
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)


def exactly_folded(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``rewrite.fold(model, x)``, checked to compute what ``model`` does (1e-5 relative)."""
    folded = rewrite.fold(model, x)
    with torch.no_grad():
        assert relative_error(folded(x), model(x)) < 1e-5
    return folded


def shuffles_left(model: nn.Module) -> int:
    """Strided channel slices and index_selects in the graph: what a channel shuffle is made of."""
    count = 0
    for node in model.graph.nodes:
        if node.target is torch.index_select:
            count += 1
        elif node.target is operator.getitem and isinstance(node.args[1], tuple):
            count += any(isinstance(s, slice) and s.step not in (None, 1) for s in node.args[1])
    return count


@pytest.fixture(scope="module")
def yolov5n_pair():
    base = with_batch_norm_statistics(create_model("yolov5n"))
    slim = with_batch_norm_statistics(rewrite.apply(base, "slim-neck", X), seed=1)
    return base, slim


@pytest.mark.parametrize("which", ["base", "slim"])
def test_yolov5n_folds_exactly_with_no_batch_norm_shuffle_or_identity_left(yolov5n_pair, which):
    model = yolov5n_pair[which == "slim"]
    folded = exactly_folded(model, X)
    kinds = {type(m) for m in folded.modules()}
    assert not kinds & {nn.BatchNorm2d, nn.Identity}
    assert shuffles_left(folded) == 0
    assert folded.stride.tolist() == model.stride.tolist()  # the model's own attributes stay readable


def test_yolov5s_slim_neck_folds_exactly():
    base = with_batch_norm_statistics(create_model("yolov5s"))
    slim = with_batch_norm_statistics(rewrite.apply(base, "slim-neck", X), seed=2)
    with torch.no_grad():
        assert relative_error(rewrite.fold(slim, X)(X), slim(X)) < 1e-5


def test_fold_is_idempotent_and_never_touches_its_input(yolov5n_pair):
    slim = yolov5n_pair[1].train()
    before = copy.deepcopy(slim.state_dict())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in slim.modules())
    rng = torch.get_rng_state()

    folded = rewrite.fold(slim, X)
    again = rewrite.fold(folded, X)

    assert slim.training and all(m.training for m in slim.modules())
    assert all(torch.equal(before[k], v) for k, v in slim.state_dict().items())
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in slim.modules())
    assert torch.equal(rng, torch.get_rng_state())
    assert [n.format_node() for n in again.graph.nodes] == [n.format_node() for n in folded.graph.nodes]
    with torch.no_grad():
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                torch.utils._pytree.tree_leaves(again(X)),
                torch.utils._pytree.tree_leaves(folded(X)),
                strict=True,
            )
        )
    slim.eval()


class ShuffleAtTheOutputs(nn.Module):
    """A GSConv whose shuffled output is a model output, another read by an index_select and an add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = GSConv(8, 16, shuffle="interleave")
        self.b = GSConv(16, 16)

    def forward(self, x):
        y = self.a(x)
        return self.b(y), y.index_select(1, torch.arange(15, -1, -1)) + 1


def test_a_shuffle_that_no_consumer_can_absorb_is_kept_once_and_exact():
    model = with_batch_norm_statistics(ShuffleAtTheOutputs())
    x = torch.randn(2, 8, 10, 10)
    folded = exactly_folded(model, x)
    # Both shuffles of `a` and the reversal compose into one order per output; `b`'s conv absorbs its input's.
    assert shuffles_left(folded) == 2


class DictInDictOut(nn.Module):
    """A forward that takes a dict of images and returns a dict, as detection training code often does."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.neck = GSConv(8, 16)

    def forward(self, batch):
        return {"features": self.neck(self.stem(batch["image"])), "count": batch["image"].shape[0]}


def test_a_forward_taking_and_returning_containers_keeps_its_calling_convention():
    model = with_batch_norm_statistics(DictInDictOut())
    batch = {"image": torch.randn(2, 3, 10, 10)}
    folded = rewrite.fold(model, (batch,))
    with torch.no_grad():
        got, expected = folded(batch), model(batch)
    assert got.keys() == expected.keys()
    assert got["count"] == 2
    assert relative_error(got["features"], expected["features"]) < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


class RoutedLayers(nn.Module):
    """The YOLOv5 / ultralytics pattern: a forward fx cannot trace that routes each layer's input by attributes
    set on the layer (``f``, where its input comes from; ``i``, its index)."""

    def __init__(self) -> None:
        super().__init__()
        layers = [
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU()),
            GSConv(8, 8),
            GSConv(8, 8, 3),
        ]
        for index, (layer, source) in enumerate(zip(layers, (-1, -1, 0), strict=True)):
            layer.f, layer.i = source, index
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        if not torch.isfinite(x).all():  # data-dependent: this forward stays the user's code
            raise ValueError("non-finite input")
        outputs = []
        for layer in self.model:
            x = layer(x if layer.f == -1 else outputs[layer.f])
            outputs.append(x)
        return x


def test_layers_keep_the_attributes_an_untraceable_forward_reads():
    model = with_batch_norm_statistics(RoutedLayers())
    x = torch.randn(2, 3, 10, 10)
    folded = exactly_folded(model, x)
    assert [(layer.f, layer.i) for layer in folded.model] == [(-1, 0), (-1, 1), (0, 2)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_graph_module_input_and_grouped_consumers_fold_exactly():
    body = nn.Sequential(
        GSConv(8, 32, 3),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise: the permutation passes through it
        nn.BatchNorm2d(32),
        nn.SiLU(),
        nn.Upsample(scale_factor=2),
        VoVGSCSP(32, 32, n=2, shuffle="interleave"),
        nn.Conv2d(32, 16, 1, groups=4),  # grouped: takes whole groups, else the order is applied first
    )
    model = fx.symbolic_trace(with_batch_norm_statistics(body))
    x = torch.randn(1, 8, 12, 12)
    folded = exactly_folded(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_torchvision_fpn_rewrite_folds_exactly():
    detection = pytest.importorskip("torchvision").models.detection
    torch.manual_seed(0)
    # The detector's backbone + FPN (the part the rule set rewrites): the whole detector takes a minute to plan.
    backbone = detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).backbone
    x = torch.rand(1, 3, 128, 128)
    slim = with_batch_norm_statistics(
        rewrite.apply(backbone.eval(), "torchvision-fpn-gsconv", x, scope="fpn")
    )
    assert sum(isinstance(m, GSConv) for m in slim.modules()) == 5  # 3 layer_blocks, P6 and P7
    folded = exactly_folded(slim, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # The five FPN levels are model outputs: each keeps its order, applied once (P7's conv absorbs P6's too).
    assert shuffles_left(folded) == 5


# --- the passes, each on its own -------------------------------------------------------------------------------


def traced_graph(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """The root region's graph module as rewrite.trace makes it (its nodes carry their shapes): what passes take."""
    (region,) = rewrite.trace(model.eval(), x).regions
    return region.graph_module


def runs_as(gm: fx.GraphModule, model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``gm``, recompiled after a pass edited its graph, still computes what ``model`` does."""
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        return relative_error(gm(x), model(x)) < 1e-6


def called(gm: fx.GraphModule) -> list[str]:
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


def test_drop_no_ops_drops_identities_and_dropouts():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Identity(), nn.Dropout(0.5), nn.ReLU(), nn.Dropout2d())
    x = torch.randn(2, 3, 8, 8)
    gm = traced_graph(model, x)
    assert drop_no_ops(gm)
    assert called(gm) == ["Conv2d", "ReLU"] and runs_as(gm, model, x)
    assert not drop_no_ops(gm)


class SharedConv(nn.Module):
    """One conv called twice, each call followed by a BatchNorm of its own; a third BatchNorm after a conv whose
    output something else reads too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.other, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn2(self.conv(self.bn1(self.conv(x))))
        z = self.other(y)
        return self.bn3(z) + z


def test_fold_batch_norms_gives_each_call_its_own_conv_and_leaves_the_model_alone():
    model = with_batch_norm_statistics(SharedConv())
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 4, 6, 6)
    gm = traced_graph(model, x)
    assert fold_batch_norms(gm)
    assert called(gm) == ["Conv2d", "Conv2d", "Conv2d", "BatchNorm2d"] and runs_as(gm, model, x)
    first, second = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"][:2]
    assert first is not second and model.conv not in (first, second)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fold_batch_norms_leaves_a_norm_that_computes_more_than_the_norm():
    timm_layers = pytest.importorskip("timm.layers")
    model = with_batch_norm_statistics(
        nn.Sequential(nn.Conv2d(3, 8, 3), timm_layers.BatchNormAct2d(8, act_layer=nn.SiLU))
    )
    x = torch.randn(2, 3, 8, 8)
    gm = traced_graph(model, x)
    assert not fold_batch_norms(gm)
    assert relative_error(exactly_folded(model, x)(x), model(x)) < 1e-6


def channel_orders(gm: fx.GraphModule) -> list[tuple[int, ...]]:
    return [n.args[1] for n in gm.graph.nodes if n.target is channel_order]


@pytest.mark.parametrize("activation", [nn.SiLU(), nn.CELU(0.5), nn.SELU(), nn.Hardtanh(-2.0, 2.0)])
def test_fold_channel_orders_moves_a_shuffle_through_any_channelwise_activation_into_the_next_conv(
    activation,
):
    model = with_batch_norm_statistics(
        nn.Sequential(GSConv(8, 16, shuffle="interleave"), activation, nn.Conv2d(16, 4, 1))
    )
    x = torch.randn(2, 8, 6, 6)
    gm = traced_graph(model, x)
    assert fold_channel_orders(gm)
    assert shuffles_left(gm) == 0 and channel_orders(gm) == [] and runs_as(gm, model, x)
    assert gm.get_submodule("2") is not model[2]  # the conv that took the order is a new one


class ShuffledResidual(nn.Module):
    """A shuffled value added to a conv's output (GSBottleneck's shortcut): that conv's rows take the order."""

    def __init__(self) -> None:
        super().__init__()
        self.gs, self.shortcut, self.head = GSConv(8, 16), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.gs(x) + torch.relu(self.shortcut(x))))


def test_fold_channel_orders_puts_the_other_operand_of_a_sum_in_the_same_order():
    model = with_batch_norm_statistics(ShuffledResidual())
    x = torch.randn(2, 8, 6, 6)
    gm = traced_graph(model, x)
    assert fold_channel_orders(gm)
    assert channel_orders(gm) == [] and runs_as(gm, model, x)


def test_an_order_nothing_takes_stays_and_is_lowered_once_per_value_and_order():
    model = with_batch_norm_statistics(ShuffleAtTheOutputs())
    x = torch.randn(2, 8, 10, 10)
    gm = traced_graph(model, x)
    assert fold_channel_orders(gm) and runs_as(gm, model, x)
    assert len(channel_orders(gm)) == 2  # `a`'s output, once reversed: each a model output
    lowered = lower_channel_orders(gm)
    assert channel_orders(lowered) == [] and shuffles_left(lowered) == 2 and runs_as(lowered, model, x)
    orders = sorted(name for name, _ in lowered.named_buffers() if name.startswith("_fold"))
    assert orders == ["_fold_channel_order", "_fold_channel_order_1"]
    assert not fold_channel_orders(traced_graph(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.randn(1, 3, 4, 4)))


class ShuffledBack(nn.Module):
    """A shuffle and its inverse, one after the other: nothing is permuted at the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return channel_shuffle(channel_shuffle(self.conv(x), "interleave"), "split")


def test_orders_that_cancel_leave_nothing():
    model, x = ShuffledBack(), torch.randn(2, 3, 4, 4)
    gm = traced_graph(model, x)
    assert fold_channel_orders(gm)
    assert channel_orders(gm) == [] and [n.op for n in gm.graph.nodes] == [
        "placeholder",
        "call_module",
        "output",
    ]
    assert runs_as(gm, model, x)
