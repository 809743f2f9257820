"""A small two-scale detector, as a detector project's own model file would hold it (plain torch, no zoo).

The CI example plans it with its neighbour ``slim-neck-rules.toml``: the action's ``model`` input names it
``examples/ci/detector.py:build`` (a file path and the callable that returns the model), so the dry run builds
the caller's model, not one of rewrite's. The children are named ``backbone``, ``neck`` and ``head``, which is
how rewrite tells the stages apart when a model carries no config of its own.

    >>> import torch
    >>> [tuple(out.shape) for out in build(nc=3)(torch.zeros(1, 3, 128, 128))]
    [(1, 8, 16, 16), (1, 8, 8, 8)]
"""

import torch
from torch import nn


class ConvBNAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> SiLU, padded to keep the size at stride 1."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU(inplace=True)
        )


class Backbone(nn.Module):
    """Five stride-2 stages; returns the stride-8 and stride-16 feature maps."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, width, 3, 2), ConvBNAct(width, 2 * width, 3, 2))
        self.p3 = ConvBNAct(2 * width, 4 * width, 3, 2)
        self.p4 = ConvBNAct(4 * width, 8 * width, 3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p3 = self.p3(self.stem(x))
        return p3, self.p4(p3)


class Neck(nn.Module):
    """A PAN: top-down (1x1 lateral, upsample, concat, fuse), then bottom-up (stride-2 conv, concat, fuse)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lateral = ConvBNAct(8 * width, 4 * width, 1)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.fuse_p3 = ConvBNAct(8 * width, 4 * width)
        self.down = ConvBNAct(4 * width, 4 * width, 3, 2)
        self.fuse_p4 = ConvBNAct(8 * width, 8 * width)

    def forward(self, features: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        p3, p4 = features
        lateral = self.lateral(p4)
        n3 = self.fuse_p3(torch.cat([self.up(lateral), p3], dim=1))
        n4 = self.fuse_p4(torch.cat([self.down(n3), lateral], dim=1))
        return n3, n4


class Detector(nn.Module):
    def __init__(self, nc: int = 80, width: int = 16) -> None:
        super().__init__()
        self.backbone = Backbone(width)
        self.neck = Neck(width)
        # Per scale: box (4), objectness (1) and class scores, one anchor per cell.
        self.head = nn.ModuleList(nn.Conv2d(c, 5 + nc, 1) for c in (4 * width, 8 * width))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [conv(feature) for conv, feature in zip(self.head, self.neck(self.backbone(x)))]


def build(nc: int = 80, width: int = 16) -> Detector:
    """The detector for ``nc`` classes; ``width`` channels after the stem's first conv."""
    return Detector(nc=nc, width=width)
