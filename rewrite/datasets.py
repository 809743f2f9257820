"""A detection task generated from a seed: coloured shapes on textured, noisy backgrounds, with YOLO labels.

Something a detector learns on a CPU in minutes, with nothing downloaded: each image holds 1 to 6 objects of 8 to
48 pixels, each one of six classes (a circle, a square or a triangle, red or blue), on a background of smooth
texture and pixel noise, among clutter that is not to be detected (lines, and the same shapes in other colours,
so that colour matters). Objects may overlap a little; a later one is drawn over an earlier one. Every image
depends only on the seed, its split and its index, so a task is the same wherever and in whatever order it is
made.

:func:`make_detection_task` writes the images (PNG), their labels (YOLO text: ``class cx cy w h``, normalised)
and the data YAML that ultralytics' trainer and validator read::

    root/data.yaml
    root/images/train/00000.png   root/labels/train/00000.txt
    root/images/val/00000.png     root/labels/val/00000.txt

>>> import tempfile
>>> from pathlib import Path
>>> data = make_detection_task(tempfile.mkdtemp(), train_images=2, val_images=1, image_size=64)
>>> print(data.read_text())  # doctest: +ELLIPSIS
# rewrite.datasets.make_detection_task(seed=0, image_size=64)
path: ...
train: images/train
val: images/val
names:
  0: red circle
  1: red square
  2: red triangle
  3: blue circle
  4: blue square
  5: blue triangle
<BLANKLINE>
>>> sorted(p.name for p in (data.parent / "images" / "train").iterdir())
['00000.png', '00001.png']
>>> first = (data.parent / "labels" / "train" / "00000.txt").read_text().splitlines()[0].split()
>>> int(first[0]) in range(6) and all(0 < float(v) <= 1 for v in first[1:])
True
"""

from __future__ import annotations

import ctypes
import os
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from rewrite.errors import InputSpecError

__all__ = ["CLASSES", "make_detection_task", "render_image"]

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.80, 0.16, 0.14), "blue": (0.14, 0.24, 0.82)}
CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
# Clutter shapes take these colours: close enough in brightness that only hue tells them from the classes.
_DECOY_COLOURS = ((0.15, 0.65, 0.20), (0.85, 0.75, 0.15), (0.60, 0.20, 0.70), (0.55, 0.55, 0.55))
_SPLITS = {"train": 0, "val": 1}
_MIN_SIZE, _MAX_SIZE = 8, 48


def make_detection_task(
    root: str | os.PathLike[str],
    *,
    train_images: int = 1000,
    val_images: int = 200,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write a generated detection task under ``root``; returns the path of its data YAML.

    ``train_images`` and ``val_images`` square images of ``image_size`` pixels (at least 64), each determined by
    ``seed``, its split and its index. Files already there under the same names are replaced.
    """
    if image_size < 64:
        raise InputSpecError(
            f"make_detection_task: image_size={image_size}; the objects are {_MIN_SIZE}-{_MAX_SIZE} px, use 64 or more"
        )
    if train_images < 1 or val_images < 1:
        raise InputSpecError(
            f"make_detection_task: train_images={train_images}, val_images={val_images}; each split needs an image"
        )
    folder = Path(root).resolve()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the images are small: more threads only wait on each other
    try:
        _write_images(folder, seed, image_size, {"train": train_images, "val": val_images})
    finally:
        torch.set_num_threads(threads)
    names = "".join(f"  {index}: {name}\n" for index, name in enumerate(CLASSES))
    data = folder / "data.yaml"
    data.write_text(
        f"# rewrite.datasets.make_detection_task(seed={seed}, image_size={image_size})\n"
        f"path: {folder}\ntrain: images/train\nval: images/val\nnames:\n{names}"
    )
    return data


def _write_images(folder: Path, seed: int, size: int, counts: dict[str, int]) -> None:
    for split, count in counts.items():
        images, labels = folder / "images" / split, folder / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels, boxes = render_image(size, seed=seed, split=split, index=index)
            (images / f"{index:05d}.png").write_bytes(_png(pixels))
            (labels / f"{index:05d}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in boxes)
            )


def render_image(
    size: int, *, seed: int = 0, split: str = "train", index: int = 0
) -> tuple[Tensor, list[tuple[int, float, float, float, float]]]:
    """One image of the task, ``(pixels, boxes)``: ``uint8`` pixels ``size × size × 3`` and its YOLO boxes.

    A box is ``(class, centre x, centre y, width, height)``, normalised by ``size``.
    """
    generator = torch.Generator().manual_seed((seed * 2 + _SPLITS[split]) * 1_000_003 + index)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    def integer(low: int, high: int) -> int:  # both ends included
        return int(torch.randint(low, high + 1, (), generator=generator))

    image = _background(size, generator)
    rows, columns = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")

    for _ in range(integer(0, 3)):  # lines across the picture
        image = _paint(
            image, _line(rows, columns, size, uniform), _jittered(_pick(_DECOY_COLOURS, integer), uniform)
        )

    placed: list[tuple[float, float, float, float]] = []
    shapes: list[tuple[int | None, tuple[float, float, float, float]]] = []
    objects, decoys = integer(1, 6), integer(0, 2)
    for number in range(objects + decoys):
        for _ in range(20):  # a few tries to place it without hiding much of another
            width, height = uniform(_MIN_SIZE, _MAX_SIZE), uniform(_MIN_SIZE, _MAX_SIZE)
            height = min(max(height, width * 0.6), width / 0.6)  # not too thin to see
            left, top = uniform(0, size - width), uniform(0, size - height)
            box = (left, top, left + width, top + height)
            if all(_overlap(box, other) < 0.3 for other in placed):
                placed.append(box)
                shapes.append((integer(0, len(CLASSES) - 1) if number < objects else None, box))
                break

    boxes = []
    for cls, box in shapes:
        shape = SHAPES[cls % len(SHAPES)] if cls is not None else SHAPES[integer(0, len(SHAPES) - 1)]
        colour = (
            list(COLOURS.values())[cls // len(SHAPES)] if cls is not None else _pick(_DECOY_COLOURS, integer)
        )
        image = _paint(image, _mask(shape, box, rows, columns), _jittered(colour, uniform))
        if cls is not None:
            left, top, right, bottom = box
            boxes.append(
                (
                    cls,
                    (left + right) / 2 / size,
                    (top + bottom) / 2 / size,
                    (right - left) / size,
                    (bottom - top) / size,
                )
            )

    image = image + 0.04 * torch.randn(image.shape, generator=generator)  # sensor noise over everything
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return pixels, boxes


def _background(size: int, generator: torch.Generator) -> Tensor:
    """A smooth texture: coarse random grids of two scales, upsampled, around a random mid tone."""
    tone = 0.3 + 0.4 * torch.rand(3, 1, 1, generator=generator)
    texture = torch.zeros(3, size, size)
    for cells, strength in ((4, 0.18), (16, 0.08)):
        grid = torch.rand(1, 3, cells, cells, generator=generator) - 0.5
        texture += strength * F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)[0]
    return tone + texture


def _mask(shape: str, box: tuple[float, float, float, float], rows: Tensor, columns: Tensor) -> Tensor:
    left, top, right, bottom = box
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    half_width, half_height = (right - left) / 2, (bottom - top) / 2
    if shape == "circle":
        return ((columns - centre_x) / half_width) ** 2 + ((rows - centre_y) / half_height) ** 2 <= 1
    if shape == "square":
        return ((columns - centre_x).abs() <= half_width) & ((rows - centre_y).abs() <= half_height)
    # a triangle standing on the box's bottom edge, its apex at the middle of the top edge
    depth = (rows - top) / (bottom - top)
    return (depth >= 0) & (depth <= 1) & ((columns - centre_x).abs() <= depth * half_width)


def _line(rows: Tensor, columns: Tensor, size: int, uniform) -> Tensor:
    x0, y0, x1, y1 = (uniform(0, size) for _ in range(4))
    length = max(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5, 1.0)
    along = ((columns - x0) * (x1 - x0) + (rows - y0) * (y1 - y0)) / length
    across = ((columns - x0) * (y1 - y0) - (rows - y0) * (x1 - x0)).abs() / length
    return (across <= uniform(0.5, 1.5)) & (along >= 0) & (along <= length)


def _paint(image: Tensor, mask: Tensor, colour: tuple[float, float, float]) -> Tensor:
    return torch.where(mask, torch.tensor(colour).view(3, 1, 1), image)


def _jittered(colour: tuple[float, float, float], uniform) -> tuple[float, float, float]:
    shade = uniform(0.8, 1.15)
    return tuple(min(1.0, channel * shade + uniform(-0.05, 0.05)) for channel in colour)


def _pick(options: tuple, integer):
    return options[integer(0, len(options) - 1)]


def _overlap(box: tuple[float, ...], other: tuple[float, ...]) -> float:
    """The share of the smaller box that the two boxes have in common."""
    width = min(box[2], other[2]) - max(box[0], other[0])
    height = min(box[3], other[3]) - max(box[1], other[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
    return width * height / smaller


def _png(pixels: Tensor) -> bytes:
    """``uint8`` pixels ``height × width × 3`` as a PNG file (8-bit RGB, no filtering)."""
    height, width, _ = pixels.shape
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), pixels.reshape(height, width * 3)], dim=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = rows.contiguous()
    raw = ctypes.string_at(rows.data_ptr(), rows.numel())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
