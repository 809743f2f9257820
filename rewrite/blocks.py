"""The GS building blocks of Slim-neck (Li et al., "Slim-neck by GSConv", arXiv 2206.02424).

``GSConv`` mixes a dense convolution with a cheap depthwise one and shuffles their channels together;
``GSBottleneck`` and ``VoVGSCSP`` stack GSConvs into the cross-stage block that replaces a CSP/C3 block.
They are plain ``nn.Module``s with no dependency on any detector, and their submodule names are those of the
reference checkpoints (``cv1``, ``cv2``, ``conv_lighting``, ``shortcut``, ``gsb``, ``cv3``), so those
checkpoints load by key.
"""

from __future__ import annotations

import copy
from typing import Literal, get_args

import torch
from torch import Tensor, nn

__all__ = ["SHUFFLE_VARIANTS", "ConvBNAct", "GSBottleneck", "GSConv", "VoVGSCSP", "channel_shuffle"]

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


class ConvBNAct(nn.Module):
    """``Conv2d`` (no bias, "same" padding ``kernel_size // 2``) -> ``BatchNorm2d`` -> activation.

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
        self.conv = nn.Conv2d(
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
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
        self.cv1 = ConvBNAct(in_channels, half, kernel_size, stride, groups, act, **bn)
        self.cv2 = ConvBNAct(half, half, dw_kernel, 1, half, act, **bn)
        self.shuffle = shuffle

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.cv1(x)
        return channel_shuffle(torch.cat((x1, self.cv2(x1)), 1), self.shuffle)


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
        common = dict(dw_kernel=dw_kernel, shuffle=shuffle, bn_eps=bn_eps, bn_momentum=bn_momentum)
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
        bn = dict(bn_eps=bn_eps, bn_momentum=bn_momentum)
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
