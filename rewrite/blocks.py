"""The GS building blocks of Slim-neck (Li et al., "Slim-neck by GSConv", arXiv 2206.02424).

``GSConv`` mixes a dense convolution with a cheap depthwise one and shuffles their channels together;
``GSBottleneck`` and ``VoVGSCSP`` stack GSConvs into the cross-stage block that replaces a CSP/C3 block.
They are plain ``nn.Module``s with no dependency on any detector, and their submodule names are those of the
reference checkpoints (``cv1``, ``cv2``, ``conv_lighting``, ``shortcut``, ``gsb``, ``cv3``), so those
checkpoints load by key.

Warm-start hook: ``GSConv`` and ``VoVGSCSP`` have ``warm_start_from(replaced)``, which copies into the block
the weights of the module it replaces wherever the block can compute exactly what that module computes (see
each method). :func:`rewrite.warm_start` calls it, when a new block has it, before fitting the rest.
"""

from __future__ import annotations

import copy
from typing import Literal, get_args

import torch
from torch import Tensor, fx, nn

from rewrite.vocabulary import category_of

__all__ = [
    "SHUFFLE_VARIANTS",
    "ConvBNAct",
    "DepthwiseConv2d",
    "GSBottleneck",
    "GSConv",
    "VoVGSCSP",
    "channel_shuffle",
]

ShuffleVariant = Literal["split", "interleave"]
SHUFFLE_VARIANTS: tuple[str, ...] = get_args(ShuffleVariant)

# ``True`` means the reference SiLU, ``False``/``None`` no activation, a module: that activation.
Activation = bool | None | nn.Module

# The reference YOLOv5 values; with PyTorch's defaults (1e-5, 0.1) reference weights give different outputs.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def channel_shuffle(x: Tensor, variant: ShuffleVariant = "split") -> Tensor:
    """Shuffle the channels (dim 1) of ``x``, whose first and second halves come from two different branches.

    ``"split"`` (the reference YOLOv5 code) takes the even channels, then the odd ones; ``"interleave"`` (the
    reference YOLOv8-11 code, as in ShuffleNet) alternates the two halves. Both are fixed permutations, but
    different ones: weights trained with one are only valid with the same one.

    >>> x = torch.arange(8.0).view(1, 8, 1, 1)
    >>> channel_shuffle(x, "split").flatten().tolist()
    [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
    >>> channel_shuffle(x, "interleave").flatten().tolist()
    [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
    """
    _check_shuffle(variant)
    if variant == "split":
        return torch.cat((x[:, 0::2], x[:, 1::2]), 1)
    # (B, 2C', ...) -> (B, 2, C', ...) -> (B, C', 2, ...): channel c' of each half ends up side by side.
    return x.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)


def _check_shuffle(variant: str) -> None:
    if variant not in SHUFFLE_VARIANTS:
        raise ValueError(
            f"unknown channel shuffle {variant!r}; expected one of {', '.join(SHUFFLE_VARIANTS)}"
        )


def _make_activation(act: Activation) -> nn.Module:
    if act is True:
        return nn.SiLU()
    if act is False or act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        # A copy per use: a stateful activation (PReLU) must not share parameters between layers.
        return copy.deepcopy(act)
    raise TypeError(f"act must be a bool, None or an nn.Module, got {type(act).__name__}")


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``Conv2d`` whose training step on a CPU runs in channels-last memory order.

    It is ``nn.Conv2d`` (same arguments, parameters and function, so everything that knows a conv knows it);
    only the memory order of its input changes, and only where gradients flow on a CPU. There, PyTorch's
    backward pass of a depthwise convolution over contiguous (NCHW) tensors is many times slower than over
    channels-last ones, enough to make a GS block train slower than the dense block it replaces
    (``bench/train_speed.py`` measures it). Inference, and every other device, runs ``nn.Conv2d`` as it is.

    >>> conv = DepthwiseConv2d(8, 8, 5, padding=2, groups=8)
    >>> x = torch.randn(2, 8, 16, 16, requires_grad=True)
    >>> torch.allclose(conv(x), nn.functional.conv2d(x, conv.weight, conv.bias, padding=2, groups=8), atol=1e-6)
    True
    """

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            # Plain fx keeps only torch.nn's own classes whole; to it this is one call of a conv, as Conv2d is.
            tracer = input.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (input,), {})
        training = torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad)
        if training and input.device.type == "cpu" and input.dim() == 4:
            input = input.contiguous(memory_format=torch.channels_last)
        return super().forward(input)


class ConvBNAct(nn.Module):
    """``Conv2d`` (no bias, "same" padding ``kernel_size // 2``) -> ``BatchNorm2d`` -> activation.

    A depthwise conv (``groups`` equal to both channel counts) is a :class:`DepthwiseConv2d`.

    >>> block = ConvBNAct(16, 32, kernel_size=3, stride=2)
    >>> block(torch.randn(1, 16, 20, 20)).shape
    torch.Size([1, 32, 10, 10])
    >>> [name for name, _ in block.named_children()]
    ['conv', 'bn', 'act']
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        stride: int = 1,
        groups: int = 1,
        act: Activation = True,
        *,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        # "same" padding per dimension, so that a (1, 7) kernel keeps the size too
        padding = tuple(k // 2 for k in kernel_size) if isinstance(kernel_size, tuple) else kernel_size // 2
        depthwise = 1 < groups == in_channels == out_channels
        self.conv = (DepthwiseConv2d if depthwise else nn.Conv2d)(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.act = _make_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class GSConv(nn.Module):
    """GSConv: a dense conv to half the output channels, a depthwise conv of those, both halves shuffled.

    ``cv1`` maps ``in_channels`` to ``out_channels // 2`` with ``kernel_size``, ``stride`` and ``groups``;
    ``cv2`` is a depthwise ``dw_kernel`` x ``dw_kernel`` conv of cv1's output. Their concatenation goes
    through :func:`channel_shuffle` with the ``shuffle`` variant. ``out_channels`` must be even, because half
    of it comes from the depthwise branch; an odd value raises ``ValueError``.

    >>> gsconv = GSConv(64, 128, kernel_size=3, stride=2)
    >>> gsconv(torch.randn(1, 64, 32, 32)).shape
    torch.Size([1, 128, 16, 16])
    >>> sum(p.numel() for p in gsconv.parameters())  # 64*64*3*3 + 2*64  +  64*5*5 + 2*64
    38720
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        stride: int = 1,
        groups: int = 1,
        act: Activation = True,
        *,
        dw_kernel: int = 5,
        shuffle: ShuffleVariant = "split",
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        if out_channels % 2:
            raise ValueError(
                f"GSConv out_channels must be even (half come from the depthwise branch), got {out_channels}"
            )
        _check_shuffle(shuffle)  # at construction, not at the first forward pass
        half = out_channels // 2
        bn = {"bn_eps": bn_eps, "bn_momentum": bn_momentum}
        self.cv1 = ConvBNAct(in_channels, half, kernel_size, stride, groups, act, **bn)
        self.cv2 = ConvBNAct(half, half, dw_kernel, 1, half, act, **bn)
        self.shuffle = shuffle

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.cv1(x)
        return channel_shuffle(torch.cat((x1, self.cv2(x1)), 1), self.shuffle)

    def warm_start_from(self, replaced: nn.Module) -> bool:
        """Make half the output channels exactly those of ``replaced``, a conv -> norm -> activation unit.

        ``replaced`` qualifies when its modules are exactly one ``Conv2d`` of cv1's shape (kernel, stride,
        padding, dilation, groups, input channels) with twice cv1's output channels, at most one BatchNorm of
        those channels, and parameter-free modules of cv1's activation class. The channel shuffle puts cv1's
        channel ``i`` at some output position ``p``: cv1's row ``i`` (conv weights, BatchNorm parameters and
        statistics) becomes ``replaced``'s row ``p``, so those outputs equal ``replaced``'s (assuming it
        computes activation(norm(conv(x))), which the caller checks on data). The depthwise half is left as it
        is, to be fitted. Returns whether it copied; otherwise nothing changed.
        """
        unit = _conv_norm_act(replaced)
        if (
            unit is None
            or not _same_conv_geometry(unit[0], self.cv1.conv, out_factor=2)
            or type(unit[2]) is not type(self.cv1.act)
        ):
            return False
        channels = unit[0].out_channels
        order = channel_shuffle(torch.arange(channels, dtype=torch.float32).view(1, -1, 1, 1), self.shuffle)
        # order[p] is the channel of cat(cv1, cv2) at output position p; cv1's channel i lands where order == i.
        positions = torch.argsort(order.flatten().long())[: channels // 2]
        _copy_rows(self.cv1, unit, positions)
        return True


# A conv -> norm -> activation unit of a replaced module: its conv, its BatchNorm if any, its activation
# (an Identity when it has none).
_Unit = tuple[nn.Conv2d, nn.Module | None, nn.Module]


def _conv_norm_act(module: nn.Module) -> _Unit | None:
    """``module``'s (conv, norm, activation) when its leaves are one conv, at most one norm with running
    statistics and at most one activation other than ``Identity`` (categories as :mod:`rewrite.vocabulary`
    defines them); ``None`` for anything else."""
    found: dict[str, list[nn.Module]] = {"conv": [], "norm": [], "activation": []}
    for child in module.modules():
        if next(child.children(), None) is not None or isinstance(child, nn.Identity):
            continue  # a container (its leaves are looked at), or nothing computed
        category = category_of(child)
        if category not in found or (category == "norm" and not _has_running_statistics(child)):
            return None  # another op, or a norm with no fixed function to copy (batch statistics, GroupNorm)
        found[category].append(child)
    convs, norms, activations = found["conv"], found["norm"], found["activation"]
    if len(convs) != 1 or len(norms) > 1 or len(activations) > 1:
        return None
    return convs[0], (norms or [None])[0], (activations or [nn.Identity()])[0]


def _has_running_statistics(norm: nn.Module) -> bool:
    return (
        getattr(norm, "track_running_stats", True)
        and getattr(norm, "running_mean", None) is not None
        and getattr(norm, "running_var", None) is not None
    )


def _same_conv_geometry(source: nn.Conv2d, target: nn.Conv2d, *, out_factor: int = 1) -> bool:
    """Whether ``target`` computes ``source``'s outputs when it gets a subset of its rows."""
    return (
        source.weight.shape[1:] == target.weight.shape[1:]
        and source.out_channels == out_factor * target.out_channels
        and (source.stride, source.padding, source.dilation, source.groups, source.padding_mode)
        == (target.stride, target.padding, target.dilation, target.groups, target.padding_mode)
    )


def _copy_rows(target: ConvBNAct, unit: _Unit, rows: Tensor | slice) -> None:
    """Copy the rows ``rows`` of a (conv, norm, activation) unit into ``target``, a ConvBNAct.

    A missing norm becomes the identity (statistics 0 and 1 - eps, scale 1, shift 0: ``x / sqrt(1 - eps +
    eps)``), a conv bias moves into the norm's shift, and a different ``eps`` is made up for in the variance,
    so that ``target`` computes the same numbers.
    """
    conv, norm, _ = unit
    with torch.no_grad():
        target.conv.weight.copy_(conv.weight[rows])
        bn = target.bn
        if norm is None:
            bn.running_mean.zero_()
            bn.running_var.fill_(1 - bn.eps)
            bn.weight.fill_(1)
            bn.bias.zero_()
        else:
            bn.running_mean.copy_(norm.running_mean[rows])
            bn.running_var.copy_((norm.running_var[rows] + norm.eps - bn.eps).clamp_min(0))
            bn.weight.copy_(norm.weight[rows] if norm.weight is not None else torch.ones_like(bn.weight))
            bn.bias.copy_(norm.bias[rows] if norm.bias is not None else torch.zeros_like(bn.bias))
        if conv.bias is not None:
            # BN(conv(x) + b) = BN'(conv(x)) with its mean shifted by -b.
            bn.running_mean.sub_(conv.bias[rows])


class GSBottleneck(nn.Module):
    """Two GSConvs (1x1, then ``kernel_size`` without activation) plus a 1x1 conv shortcut, added.

    The hidden width is ``int(out_channels * expansion)``. ``act`` applies to the first GSConv only; the
    second GSConv and the shortcut are linear, so the sum is not clipped before the next block.

    >>> block = GSBottleneck(64, 64)
    >>> block(torch.randn(2, 64, 16, 16)).shape
    torch.Size([2, 64, 16, 16])
    >>> [name for name, _ in block.named_children()]
    ['conv_lighting', 'shortcut']
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        expansion: float = 0.5,
        act: Activation = True,
        dw_kernel: int = 5,
        shuffle: ShuffleVariant = "split",
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        common = {"dw_kernel": dw_kernel, "shuffle": shuffle, "bn_eps": bn_eps, "bn_momentum": bn_momentum}
        self.conv_lighting = nn.Sequential(
            GSConv(in_channels, hidden, 1, 1, act=act, **common),
            GSConv(hidden, out_channels, kernel_size, 1, act=False, **common),
        )
        self.shortcut = ConvBNAct(
            in_channels, out_channels, 1, 1, act=False, bn_eps=bn_eps, bn_momentum=bn_momentum
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_lighting(x) + self.shortcut(x)


class VoVGSCSP(nn.Module):
    """VoV-GSCSP: a cross-stage block whose deep branch is ``n`` GSBottlenecks; a drop-in for C3.

    With ``hidden = int(out_channels * expansion)``: ``cv1`` and ``cv2`` are 1x1 convs to ``hidden``, ``gsb``
    runs ``n`` GSBottlenecks on cv1's branch, and ``cv3`` fuses ``cat(cv2(x), gsb(cv1(x)))`` (cv2's branch
    first, as in the reference) to ``out_channels``. The reference's unused ``res`` conv is left out.

    >>> block = VoVGSCSP(128, 128, n=2)
    >>> block(torch.randn(1, 128, 20, 20)).shape
    torch.Size([1, 128, 20, 20])
    >>> [name for name, _ in block.named_children()]
    ['cv1', 'cv2', 'gsb', 'cv3']
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n: int = 1,
        *,
        expansion: float = 0.5,
        act: Activation = True,
        dw_kernel: int = 5,
        shuffle: ShuffleVariant = "split",
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        bn = {"bn_eps": bn_eps, "bn_momentum": bn_momentum}
        self.cv1 = ConvBNAct(in_channels, hidden, 1, 1, act=act, **bn)
        self.cv2 = ConvBNAct(in_channels, hidden, 1, 1, act=act, **bn)
        self.gsb = nn.Sequential(
            *(
                GSBottleneck(
                    hidden, hidden, expansion=1.0, act=act, dw_kernel=dw_kernel, shuffle=shuffle, **bn
                )
                for _ in range(n)
            )
        )
        self.cv3 = ConvBNAct(2 * hidden, out_channels, 1, act=act, **bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.cv2(x), self.gsb(self.cv1(x))), 1))

    def warm_start_from(self, replaced: nn.Module) -> bool:
        """Copy ``replaced``'s three outer convs into cv1, cv2 and cv3 when it is a CSP block of this shape.

        The test is on the dataflow of ``replaced``'s forward (``torch.fx``, each conv -> norm -> activation
        child a leaf), not on names: its output must be a child unit (one ``Conv2d``, at most one BatchNorm,
        an activation of this block's class) of the channel concatenation of two branches; one branch is a
        single unit of the input (it becomes cv2, the branch that skips the bottlenecks), the other starts with
        a unit of the input and goes on through more modules (its first unit becomes cv1; the rest, the
        bottlenecks, is left to fitting). cv3's input columns follow this block's concatenation order (cv2's
        branch first). Shapes must match exactly. The GSBottlenecks, which have nothing to copy, then start
        silent: the scales of their last norms (their second GSConv's and their shortcut's) are zeroed, so that
        they add nothing until fitting teaches them; the output of random bottlenecks would be noise that cv3's
        copied weights turn into a larger error than none. Returns whether it copied; a forward that does not
        trace or any other structure (a C2f, say) leaves the block as it is and returns ``False``.
        """
        outer = _csp_units(replaced)
        if outer is None:
            return False
        skip, deep, output, deep_first = outer
        pairs = ((self.cv2, skip), (self.cv1, deep), (self.cv3, output))
        if not all(
            _same_conv_geometry(unit[0], target.conv) and type(unit[2]) is type(target.act)
            for target, unit in pairs
        ):
            return False
        for target, unit in pairs:
            _copy_rows(target, unit, slice(None))
        if deep_first:  # replaced concatenates (bottlenecks, skip); this block (skip, bottlenecks)
            hidden = self.cv1.conv.out_channels
            with torch.no_grad():
                weight = output[0].weight
                self.cv3.conv.weight.copy_(torch.cat((weight[:, hidden:], weight[:, :hidden]), 1))
        with torch.no_grad():
            for bottleneck in self.gsb:
                last = bottleneck.conv_lighting[-1]
                for norm in (last.cv1.bn, last.cv2.bn, bottleneck.shortcut.bn):
                    norm.weight.zero_()
                    norm.bias.zero_()
        return True


class _UnitLeaves(fx.Tracer):
    """Traces a module down to its children that are conv -> norm -> activation units (kept as leaves)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return _conv_norm_act(module) is not None or super().is_leaf_module(module, qualified_name)


def _csp_units(module: nn.Module) -> tuple[_Unit, _Unit, _Unit, bool] | None:
    """(skip unit, deep branch's first unit, output unit, whether the deep branch is concatenated first) of a
    CSP-shaped ``module`` (see :meth:`VoVGSCSP.warm_start_from`), else ``None``."""
    try:
        graph = _UnitLeaves().trace(module)
    except Exception:  # noqa: BLE001 -- a forward fx cannot trace: no structure to read, the caller falls back
        return None
    nodes = list(graph.nodes)
    inputs = [node for node in nodes if node.op == "placeholder"]
    (result,) = [node for node in nodes if node.op == "output"]
    units = {
        node: unit
        for node in nodes
        if node.op == "call_module"
        and (unit := _conv_norm_act(module.get_submodule(node.target))) is not None
    }
    output = result.args[0]
    if len(inputs) != 1 or output not in units or len(output.args) != 1:
        return None
    concat = output.args[0]
    branches = concat.args[0] if concat.op == "call_function" and concat.target is torch.cat else None
    dim = concat.kwargs.get("dim", concat.args[1] if len(concat.args) > 1 else 0) if branches else None
    if not isinstance(branches, (list, tuple)) or len(branches) != 2 or dim != 1:
        return None
    # Per branch, the units applied to the input itself that it depends on.
    firsts = [[n for n in _ancestors(branch) if n in units and n.args == (inputs[0],)] for branch in branches]
    if any(len(first) != 1 for first in firsts) or firsts[0][0] is firsts[1][0]:
        return None
    direct = [branch is first[0] for branch, first in zip(branches, firsts)]
    if sorted(direct) != [False, True]:
        return None  # not one skip unit and one longer branch
    deep_index = direct.index(False)
    return units[firsts[1 - deep_index][0]], units[firsts[deep_index][0]], units[output], deep_index == 0


def _ancestors(node: fx.Node) -> list[fx.Node]:
    """``node`` and every node it is computed from."""
    seen, stack = {node}, [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return list(seen)
