"""YOLOv5 (v6.0 and later) from code: its blocks, a config-driven ``DetectionModel``, and yolov5n/s/m/l/x.

Structure, argument order and submodule names follow the public YOLOv5 code, so the state-dict keys and shapes
are those of the public checkpoints. The model stands in for a detector this library did not write, which is
why it shares nothing with :mod:`rewrite.blocks`.

>>> import torch
>>> model = yolov5n(nc=3).eval()
>>> boxes, maps = model(torch.zeros(1, 3, 64, 64))
>>> boxes.shape, [tuple(m.shape) for m in maps]
(torch.Size([1, 252, 8]), [(1, 3, 8, 8, 8), (1, 3, 4, 4, 8), (1, 3, 2, 2, 8)])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rewrite.errors import ModelSpecError
from rewrite.zoo import register_model

__all__ = [
    "C3",
    "SPPF",
    "Bottleneck",
    "Concat",
    "Conv",
    "Detect",
    "DetectionModel",
    "yolov5l",
    "yolov5m",
    "yolov5n",
    "yolov5s",
    "yolov5x",
]

# YOLOv5 trains with these instead of PyTorch's defaults (1e-5, 0.1); its weights expect them.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU, with "same" padding unless ``p`` is given."""

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 1,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        d: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        if p is None:
            p = (d * (k - 1) + 1) // 2  # half the dilated kernel: "same" for odd k, as YOLOv5 pads even ones
        self.conv = nn.Conv2d(c1, c2, k, s, p, groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 Conv to ``int(c2 * e)``, 3x3 Conv to ``c2``; adds the input when ``shortcut`` and shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convs: ``cv3(cat(m(cv1(x)), cv2(x)))``, ``m`` being ``n`` Bottlenecks."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5
    ) -> None:
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained ``k`` x ``k`` max-pools (windows k, 2k-1 and 3k-2)."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(4 * hidden, c2, 1, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    """Concatenates a list of tensors along dimension ``d``."""

    def __init__(self, d: int = 1) -> None:
        super().__init__()
        self.d = d

    def forward(self, x: list[Tensor]) -> Tensor:
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """The YOLOv5 head: per level a biased 1x1 conv to ``na * (nc + 5)`` channels, decoded in eval mode.

    ``anchors`` are pixel sizes, one flat ``(w, h, w, h, ...)`` list per level; ``ch`` and ``strides`` are the
    channels and strides of the input levels. Training returns the raw maps ``(B, na, ny, nx, nc + 5)``;
    eval returns ``(boxes, raw maps)`` where boxes ``(B, levels * na * ny * nx, nc + 5)`` hold pixel xywh,
    objectness and class scores.
    """

    def __init__(
        self, nc: int, anchors: Sequence[Sequence[float]], ch: Sequence[int], strides: Sequence[float]
    ) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        # A plain CPU attribute, not a buffer: the checkpoints have no such key, it must stay readable when
        # the model is built on meta, and a 0-dim CPU tensor multiplies tensors on any device.
        self.stride = torch.tensor(strides, dtype=torch.float32, device="cpu")
        grid_anchors = [[a / s for a in level] for level, s in zip(anchors, strides, strict=True)]
        self.register_buffer("anchors", torch.tensor(grid_anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in ch)
        # Decoding offsets, cached per level and rebuilt when the feature map's size or device changes.
        self.grid = [torch.empty(0)] * self.nl
        self.anchor_grid = [torch.empty(0)] * self.nl
        self._init_biases()

    def _init_biases(self) -> None:
        # Start from sensible priors instead of sigmoid(0) = 0.5 everywhere: about 8 objects per 640x640 image
        # for objectness, and a class probability of about 0.6 / nc.
        with torch.no_grad():
            for conv, stride in zip(self.m, self.stride.tolist(), strict=True):
                bias = conv.bias.view(self.na, self.no)
                bias[:, 4] += math.log(8 / (640 / stride) ** 2)
                bias[:, 5:] += math.log(0.6 / (self.nc - 0.99999))

    def forward(self, x: list[Tensor]) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        raw, boxes = [], []
        for i in range(self.nl):
            p = self.m[i](x[i])
            bs, _, ny, nx = p.shape
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(p)
            if self.training:
                continue
            if self.grid[i].shape[2:4] != p.shape[2:4] or self.grid[i].device != p.device:
                self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i, p)
            xy, wh, scores = p.sigmoid().split((2, 2, self.nc + 1), 4)
            xy = (xy * 2 + self.grid[i]) * self.stride[i]
            wh = (wh * 2) ** 2 * self.anchor_grid[i]
            boxes.append(torch.cat((xy, wh, scores), 4).view(bs, self.na * ny * nx, self.no))
        return raw if self.training else (torch.cat(boxes, 1), raw)

    def _make_grid(self, nx: int, ny: int, i: int, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.na, ny, nx, 2)
        y, x = (torch.arange(n, device=like.device, dtype=like.dtype) for n in (ny, nx))
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        # The -0.5 lets a centre reach half a cell beyond its own: xy = 2 * sigmoid - 0.5 spans (-0.5, 1.5).
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2).expand(shape)
        return grid, anchor_grid.to(like.dtype)


_MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "SPPF": SPPF,
    "Concat": Concat,
    "nn.Upsample": nn.Upsample,
    "Detect": Detect,
}


class DetectionModel(nn.Module):
    """A YOLOv5 detector assembled from a config dict shaped like the YOLOv5 YAML files.

    ``cfg`` holds ``nc``, ``depth_multiple``, ``width_multiple``, ``anchors`` and the ``backbone`` and
    ``head`` lists of ``[from, number, module, args]`` rows; it is kept, copied, as ``self.yaml``.
    ``self.model`` is an ``nn.Sequential`` whose layers carry ``i`` (index), ``f`` (from: -1 for the previous
    layer, or indices), ``type`` (class name) and ``np`` (parameter count); ``forward`` routes tensors by
    ``f``.
    """

    def __init__(self, cfg: dict[str, Any], ch: int = 3) -> None:
        super().__init__()
        self.yaml = copy.deepcopy(cfg)
        self.model, self.save = _build_layers(self.yaml, ch)
        self.stride = self.model[-1].stride

    def forward(self, x: Tensor) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        outputs: list[Tensor | None] = []  # only the layers in self.save are kept, the rest are freed
        for layer in self.model:
            if isinstance(layer.f, int):
                x = x if layer.f == -1 else outputs[layer.f]
            else:
                x = [x if j == -1 else outputs[j] for j in layer.f]
            x = layer(x)
            outputs.append(x if layer.i in self.save else None)
        return x


def _build_layers(cfg: dict[str, Any], ch: int) -> tuple[nn.Sequential, list[int]]:
    """The layers of ``cfg``, depth and width scaled, and the indices of the outputs later layers reuse."""
    nc, anchors = cfg["nc"], cfg["anchors"]
    depth, width = cfg["depth_multiple"], cfg["width_multiple"]
    layers: list[nn.Module] = []
    save: set[int] = set()
    channels: list[int] = []  # output channels of each layer so far
    strides: list[float] = []  # output stride (input pixels per feature-map cell) of each layer so far
    for i, (f, n, name, args) in enumerate(cfg["backbone"] + cfg["head"]):
        if name not in _MODULES:
            raise ModelSpecError(f"layer {i}: unknown module {name!r}; expected one of {', '.join(_MODULES)}")
        block = _MODULES[name]
        sources = [f] if isinstance(f, int) else list(f)
        # Layer 0's "previous layer" is the image.
        c_in = [(channels or [ch])[j] for j in sources]
        s_in = [(strides or [1.0])[j] for j in sources]
        args = [nc if a == "nc" else anchors if a == "anchors" else a for a in args]
        n = max(round(n * depth), 1) if n > 1 else n
        if block in (Conv, Bottleneck, C3, SPPF):
            c_out = math.ceil(args[0] * width / 8) * 8
            args = [c_in[0], c_out, *args[1:]]
            if block is C3:
                args.insert(2, n)  # C3 repeats its own bottlenecks instead of being repeated
                n = 1
        elif block is Concat:
            c_out = sum(c_in)
        elif block is Detect:
            args = [*args, c_in, s_in]
            c_out = 0  # its output is not a feature map; nothing may take it as input
        else:
            c_out = c_in[0]
        layer = nn.Sequential(*(block(*args) for _ in range(n))) if n > 1 else block(*args)
        layer.i, layer.f, layer.type = i, f, block.__name__
        layer.np = sum(p.numel() for p in layer.parameters())
        layers.append(layer)
        save.update(j % i for j in sources if j != -1)
        channels.append(c_out)
        strides.append(s_in[0] * _stride_factor(layer))
    return nn.Sequential(*layers), sorted(save)


def _stride_factor(layer: nn.Module) -> float:
    # Derived from the modules rather than found by a forward pass, so that building on meta works.
    if isinstance(layer, Conv):
        return layer.conv.stride[0]
    if isinstance(layer, nn.Upsample):
        return 1 / layer.scale_factor
    return 1.0  # C3, SPPF, Concat keep the resolution


_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]

_BACKBONE = [
    [-1, 1, "Conv", [64, 6, 2, 2]],  # 0, stride 2
    [-1, 1, "Conv", [128, 3, 2]],  # 1, stride 4
    [-1, 3, "C3", [128]],
    [-1, 1, "Conv", [256, 3, 2]],  # 3, stride 8
    [-1, 6, "C3", [256]],
    [-1, 1, "Conv", [512, 3, 2]],  # 5, stride 16
    [-1, 9, "C3", [512]],
    [-1, 1, "Conv", [1024, 3, 2]],  # 7, stride 32
    [-1, 3, "C3", [1024]],
    [-1, 1, "SPPF", [1024, 5]],  # 9
]

# "head" as YOLOv5 names it: the neck (layers 10-23) and the Detect layer (24).
_HEAD = [
    [-1, 1, "Conv", [512, 1, 1]],  # 10
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
    [[-1, 6], 1, "Concat", [1]],
    [-1, 3, "C3", [512, False]],  # 13
    [-1, 1, "Conv", [256, 1, 1]],  # 14
    [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
    [[-1, 4], 1, "Concat", [1]],
    [-1, 3, "C3", [256, False]],  # 17, stride 8 output
    [-1, 1, "Conv", [256, 3, 2]],
    [[-1, 14], 1, "Concat", [1]],
    [-1, 3, "C3", [512, False]],  # 20, stride 16 output
    [-1, 1, "Conv", [512, 3, 2]],
    [[-1, 10], 1, "Concat", [1]],
    [-1, 3, "C3", [1024, False]],  # 23, stride 32 output
    [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],  # 24
]


def _yolov5(depth_multiple: float, width_multiple: float, nc: int, ch: int) -> DetectionModel:
    _check_count("nc", nc, "the number of classes")
    _check_count("ch", ch, "the input image's channels")
    cfg = {
        "nc": nc,
        "depth_multiple": depth_multiple,
        "width_multiple": width_multiple,
        "anchors": _ANCHORS,
        "backbone": _BACKBONE,
        "head": _HEAD,
    }
    return DetectionModel(cfg, ch)


def _check_count(name: str, value: object, meaning: str) -> None:
    # Arguments come from the command line too: a bad one is the user's input, not a crash deep in a layer.
    if type(value) is not int or value < 1:
        raise ModelSpecError(f"argument {name} must be a positive integer ({meaning}), got {value!r}")


def _register_size(
    letter: str, depth_multiple: float, width_multiple: float, figures: str
) -> Callable[..., DetectionModel]:
    """The builder of one size of the network, registered as ``yolov5<letter>``; the sizes differ only in how
    deep and how wide the one config is scaled (the multiples of the public YAML files)."""

    def build(nc: int = 80, ch: int = 3) -> DetectionModel:
        return _yolov5(depth_multiple, width_multiple, nc, ch)

    build.__name__ = build.__qualname__ = f"yolov5{letter}"
    build.__doc__ = (
        f"YOLOv5-{letter.upper()} (depth {depth_multiple:.2f}, width {width_multiple:.2f}): {figures} at 640x640"
        " with nc=80."
    )
    return register_model(build)


yolov5n = _register_size("n", 0.33, 0.25, "1.87 M params, 4.47 GFLOPs")
yolov5s = _register_size("s", 0.33, 0.50, "7.24 M params, 16.4 GFLOPs")
yolov5m = _register_size("m", 0.67, 0.75, "21.2 M params, 48.9 GFLOPs")
yolov5l = _register_size("l", 1.00, 1.00, "46.6 M params, 109.0 GFLOPs")
yolov5x = _register_size("x", 1.33, 1.25, "86.7 M params, 205.4 GFLOPs")
