"""Small hand-written models for the hard cases of tracing, and a small YOLO-style detector.

Every model here is tiny and deterministic to build; tests in any file may import them. The detector,
:class:`TinyYolo`, follows the layout of YOLOv5 (``Conv`` = conv/bn/SiLU, ``C3`` blocks, ``SPPF``, an FPN+PAN
neck, a ``Detect`` head whose forward fx cannot trace, layers routed by their ``f`` / ``i`` attributes, and a
``yaml`` dict with ``backbone`` / ``head`` lists) but is written here from scratch.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# --- one hard case each ------------------------------------------------------------------------------------


class DataDependentGate(nn.Module):
    """``if`` on a tensor's value: fx cannot record the branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x * 2
        return -x


class RowLoop(nn.Module):
    """Iterates over a tensor: fx cannot iterate a Proxy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([row.flip(-1) for row in x])


class GatedNet(nn.Module):
    """conv → DataDependentGate → RowLoop → conv: both middle modules must become leaves, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = DataDependentGate()
        self.loop = RowLoop()
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.loop(self.gate(self.stem(x))))


class DictListIO(nn.Module):
    """A dict and a list of tensors in, a dict holding a tensor and a list out."""

    def __init__(self) -> None:
        super().__init__()
        self.rgb = nn.Conv2d(3, 8, 3, padding=1)
        self.depth = nn.Conv2d(1, 8, 3, padding=1)
        self.fuse = nn.Conv2d(8, 8, 1)

    def forward(self, inputs: dict[str, torch.Tensor], extras: list[torch.Tensor]) -> dict[str, Any]:
        fused = self.fuse(self.rgb(inputs["rgb"]) + self.depth(inputs["depth"]))
        return {"fused": fused, "parts": [fused + extra for extra in extras]}


class SharedBlock(nn.Module):
    """One conv called twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(self.act(self.conv(x))))


class FunctionalConv(nn.Module):
    """A convolution written with ``F.conv2d`` and a weight parameter, not with ``nn.Conv2d``."""

    def __init__(self, c1: int = 3, c2: int = 8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c2, c1, 3, 3) * 0.1)
        self.bias = nn.Parameter(torch.zeros(c2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.conv2d(x, self.weight, self.bias, padding=1))


class CatChunkSplit(nn.Module):
    """cat, chunk and split between convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(16, 12, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        left, right = y.chunk(2, dim=1)
        first, second, third = torch.split(self.c(torch.cat([right, left], 1)), [4, 4, 4], dim=1)
        return first + second, third


class Routed(nn.Module):
    """A layer list routed by index attributes, as in YOLOv5: ``x = y[m.f] if m.f != -1 else x``."""

    def __init__(self) -> None:
        super().__init__()
        layers = [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), Concat(), nn.Conv2d(16, 4, 1)]
        for i, (layer, f) in enumerate(zip(layers, [-1, -1, [-1, 0], -1], strict=True)):
            layer.i, layer.f = i, f
        self.layers = nn.ModuleList(layers)
        self.save = {0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: list[torch.Tensor | None] = []
        for m in self.layers:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


class ScaledCBA(nn.Module):
    """Conv, BatchNorm and a functional SiLU, then a fixed scale: the chain is not the module's whole call and
    ends in a function, so only a rewrite of the traced graph replaces it."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.scale = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x))) * self.scale


class CheckedRoutedLayers(nn.Module):
    """Layers routed by their own ``i`` and ``f`` (as in YOLOv5 and ultralytics) behind a forward that checks the
    input's values first, which neither fx nor a meta tensor can answer."""

    def __init__(self) -> None:
        super().__init__()
        layers = [ScaledCBA(3, 8), ScaledCBA(8, 8), ScaledCBA(8, 8)]
        for i, (layer, f) in enumerate(zip(layers, [-1, -1, 0], strict=True)):
            layer.i, layer.f = i, f
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(x).all():
            raise ValueError("the input holds inf or nan")
        y: list[torch.Tensor] = []
        for m in self.layers:
            x = m(x if m.f == -1 else y[m.f])
            y.append(x)
        return x


class FailingRoot(nn.Module):
    """The root's own forward cannot be traced (data-dependent ``if``); its children can."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = SharedBlock()
        self.head = nn.Conv2d(8, 2, 1)
        self.unused = nn.Conv2d(8, 8, 1)  # never called: gets no region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.amax() > 100:  # data-dependent: fx gives up on this forward
            x = x / 100
        return self.head(self.body(x))


class Inner(nn.Module):
    """Traceable, but holds a module that is not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.gate = DataDependentGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.inner(x))


class NestedFailing(nn.Module):
    """Only ``block.inner.gate`` fails; ``block`` and ``block.inner`` must stay traced."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Outer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


# --- TinyYolo: a small YOLOv5-style detector ---------------------------------------------------------------


def autopad(k: int, p: int | None = None) -> int:
    return k // 2 if p is None else p


class Conv(nn.Module):
    """conv → BatchNorm → SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 1)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block: two 1x1 branches, one through ``n`` bottlenecks, concatenated and fused."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        hidden = c2 // 2
        self.cv1 = Conv(c1, hidden, 1)
        self.cv2 = Conv(c1, hidden, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1)
        self.cv2 = Conv(hidden * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.d = dim

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


class Detect(nn.Module):
    """One 1x1 conv per scale, then, in eval mode, boxes decoded on a cached grid, as in YOLOv5.

    In eval mode fx cannot trace this forward: whether to rebuild the grid cache is decided by comparing
    shapes (``if`` on a Proxy), and the new grids are stored into ``self.grid``, a plain list attribute. In
    train mode it traces.
    """

    def __init__(self, nc: int, anchors: list[list[int]], ch: list[int], strides: list[int]) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.stride = torch.tensor(strides, dtype=torch.float32)  # a plain attribute, as in YOLOv5
        anchors_in_pixels = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        self.register_buffer("anchors", anchors_in_pixels / self.stride.view(-1, 1, 1))  # in grid cells
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, x: list[torch.Tensor]) -> Any:
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                y = x[i].sigmoid()
                xy = (y[..., :2] * 2 - 0.5 + self.grid[i]) * self.stride[i]
                wh = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
                z.append(torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def _make_grid(self, nx: int, ny: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        device, dtype = self.anchors.device, self.anchors.dtype
        yv, xv = torch.meshgrid(
            torch.arange(ny, device=device, dtype=dtype),
            torch.arange(nx, device=device, dtype=dtype),
            indexing="ij",
        )
        grid = torch.stack((xv, yv), 2).expand(1, self.na, ny, nx, 2)
        anchor_grid = (
            (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2).expand(1, self.na, ny, nx, 2)
        )
        return grid, anchor_grid


ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]

# Two detection scales (stride 8 and 16): backbone to stride 16, a neck of two Conv layers, one upsample,
# two concats and two C3 blocks, then Detect. Layer rows: [from, repeats, module, args].
TINY_YOLO = {
    "nc": 3,
    "depth_multiple": 1.0,
    "width_multiple": 1.0,
    "anchors": ANCHORS[:2],
    "backbone": [
        [-1, 1, "Conv", [8, 3, 2]],  # 0  /2
        [-1, 1, "Conv", [16, 3, 2]],  # 1  /4
        [-1, 1, "C3", [16]],  # 2
        [-1, 1, "Conv", [32, 3, 2]],  # 3  /8
        [-1, 1, "C3", [32]],  # 4  P3
        [-1, 1, "Conv", [64, 3, 2]],  # 5  /16
        [-1, 1, "C3", [64]],  # 6
        [-1, 1, "SPPF", [64, 5]],  # 7  P4
    ],
    "head": [
        [-1, 1, "Conv", [32, 1, 1]],  # 8
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],  # 9
        [[-1, 4], 1, "Concat", [1]],  # 10
        [-1, 1, "C3", [32, False]],  # 11  P3 out
        [-1, 1, "Conv", [32, 3, 2]],  # 12
        [[-1, 8], 1, "Concat", [1]],  # 13
        [-1, 1, "C3", [64, False]],  # 14  P4 out
        [[11, 14], 1, "Detect", ["nc", "anchors"]],  # 15
    ],
}

# The YOLOv5-L layout (v6.0 configuration: depth and width multiples 1.0), three scales; for timing tests.
YOLOV5L = {
    "nc": 80,
    "depth_multiple": 1.0,
    "width_multiple": 1.0,
    "anchors": ANCHORS,
    "backbone": [
        [-1, 1, "Conv", [64, 6, 2, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 3, "C3", [128]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 6, "C3", [256]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 9, "C3", [512]],
        [-1, 1, "Conv", [1024, 3, 2]],
        [-1, 3, "C3", [1024]],
        [-1, 1, "SPPF", [1024, 5]],
    ],
    "head": [
        [-1, 1, "Conv", [512, 1, 1]],
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 6], 1, "Concat", [1]],
        [-1, 3, "C3", [512, False]],
        [-1, 1, "Conv", [256, 1, 1]],
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 4], 1, "Concat", [1]],
        [-1, 3, "C3", [256, False]],
        [-1, 1, "Conv", [256, 3, 2]],
        [[-1, 14], 1, "Concat", [1]],
        [-1, 3, "C3", [512, False]],
        [-1, 1, "Conv", [512, 3, 2]],
        [[-1, 10], 1, "Concat", [1]],
        [-1, 3, "C3", [1024, False]],
        [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],
    ],
}

_BLOCKS = {
    "Conv": Conv,
    "C3": C3,
    "SPPF": SPPF,
    "Concat": Concat,
    "Detect": Detect,
    "nn.Upsample": nn.Upsample,
}


class TinyYolo(nn.Module):
    """A YOLOv5-style detector built from a config dict (``TINY_YOLO`` by default), e.g. on 64x64 inputs.

    ``self.model`` is an ``nn.Sequential`` of ``len(backbone) + len(head)`` layers, each with ``i`` (its
    index), ``f`` (where its input comes from: -1 = previous layer, or a list of indices) and ``type``;
    ``self.save`` lists the layers whose outputs are kept for later ones.
    """

    def __init__(self, cfg: dict[str, Any] | None = None, ch: int = 3) -> None:
        super().__init__()
        self.yaml = copy.deepcopy(cfg or TINY_YOLO)
        self.model, self.save = _parse(self.yaml, ch)
        self.stride = self.model[-1].stride

    def forward(self, x: torch.Tensor) -> Any:
        y: list[torch.Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def _parse(cfg: dict[str, Any], ch: int) -> tuple[nn.Sequential, set[int]]:
    depth, width = cfg["depth_multiple"], cfg["width_multiple"]
    channels, strides = [ch], [1]
    layers, save = [], set()
    for i, (f, n, name, args) in enumerate(cfg["backbone"] + cfg["head"]):
        block = _BLOCKS[name]
        n = max(round(n * depth), 1) if n > 1 else n
        sources = [f] if isinstance(f, int) else f
        c_in = [channels[j + 1] if j != -1 else channels[-1] for j in sources]
        s_in = [strides[j + 1] if j != -1 else strides[-1] for j in sources]
        stride = s_in[0]
        if block in (Conv, C3, SPPF):
            c2 = math.ceil(args[0] * width / 8) * 8
            extra = args[1:]
            module = C3(c_in[0], c2, n, *extra) if block is C3 else block(c_in[0], c2, *extra)
            if block is Conv and len(args) > 2:
                stride = stride * args[2]
        elif block is Concat:
            module, c2 = Concat(args[0]), sum(c_in)
        elif block is Detect:
            anchors = cfg["anchors"]
            module, c2 = Detect(cfg["nc"], anchors, c_in, s_in), 0
        else:  # nn.Upsample
            module, c2 = nn.Upsample(*args), c_in[0]
            stride = stride // args[1]
        module.i, module.f, module.type = i, f, name
        save.update(j for j in sources if j != -1)
        layers.append(module)
        channels.append(c2)
        strides.append(stride)
    return nn.Sequential(*layers), save


# --- patterns of public detector code (issue: real detectors as users have them) ----------------------------


class SharedActivationConv(nn.Module):
    """The public YOLOv5 / ultralytics ``Conv``: every instance calls one activation object, a class attribute."""

    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def share_activations(model: nn.Module) -> nn.Module:
    """``model`` with the ``SiLU`` of every block that has an ``act`` replaced by one shared object, as
    ``self.act = self.default_act`` does in the public YOLOv5 code."""
    for module in model.modules():
        if isinstance(getattr(module, "act", None), nn.SiLU):
            module.act = SharedActivationConv.default_act
    return model


def with_opaque_root(model: nn.Module) -> nn.Module:
    """``model`` whose own forward fx cannot trace (a check of the input's rank, as preprocessing does: fx cannot
    branch on ``x.dim()``); the layers are then traced one by one."""

    class InputChecked(type(model)):  # type: ignore[misc, valid-type]
        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if x.dim() != 4:
                raise ValueError(f"expected a batch of images (N, C, H, W), got {x.dim()} dimensions")
            return super().forward(x, *args, **kwargs)

    InputChecked.__name__ = f"InputChecked{type(model).__name__}"
    model.__class__ = InputChecked
    return model


class CBA(nn.Module):
    """conv → BatchNorm → ReLU, 3x3, same size."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class AliasBefore(nn.Module):
    """A block registered under a name of its own first, then placed in the layer list that the forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.last = CBA(8, 8)
        self.layers = nn.Sequential(CBA(3, 8), self.last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AliasAfter(nn.Module):
    """A handle on the last layer, registered after the layer list (``self.last = self.layers[-1]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(CBA(3, 8), CBA(8, 8))
        self.last = self.layers[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LoopedBlock(nn.Module):
    """One block called three times in a loop (weights shared across the calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = CBA(3, 8)
        self.block = CBA(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _ in range(3):
            x = self.block(x)
        return x


class ReusedConv(nn.Module):
    """One conv used twice, once followed by BatchNorm and an activation and once alone: a conv-bn-act chain
    sees the two calls differently, so they cannot share one new block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.conv = nn.Conv2d(8, 8, 3, 1, 1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(self.stem(x))))
        return self.conv(self.pool(x))


class C2fLike(nn.Module):
    """The ultralytics ``C2f`` pattern: ``list(self.cv1(x).chunk(2, 1))`` makes its forward untraceable by fx."""

    def __init__(self, c1: int, c2: int, n: int = 1) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = SharedActivationConv(c1, 2 * self.c)
        self.cv2 = SharedActivationConv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(
            nn.Sequential(SharedActivationConv(self.c, self.c, 3), SharedActivationConv(self.c, self.c, 3))
            for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C2fNet(nn.Module):
    """stem → C2f-style block → head conv, with the ultralytics ``i`` / ``f`` routing attributes on the block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SharedActivationConv(3, 16, 3, 2)
        self.block = C2fLike(16, 32, n=2)
        self.block.i, self.block.f = 1, -1
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))
