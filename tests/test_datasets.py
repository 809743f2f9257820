"""The generated detection task: deterministic by seed, labels that describe what is drawn, files ultralytics reads."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image

from rewrite.datasets import CLASSES, COLOURS, make_detection_task, render_image
from rewrite.errors import InputSpecError


def digest(folder) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in {".png", ".txt"})
    return hashlib.sha256(
        b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)
    ).hexdigest()


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    first = make_detection_task(tmp_path / "a", train_images=6, val_images=3, image_size=64, seed=3).parent
    again = make_detection_task(tmp_path / "b", train_images=6, val_images=3, image_size=64, seed=3).parent
    other = make_detection_task(tmp_path / "c", train_images=6, val_images=3, image_size=64, seed=4).parent
    assert digest(first) == digest(again)
    assert digest(first) != digest(other)


def test_an_image_depends_on_its_index_not_on_how_many_are_made(tmp_path):
    few = make_detection_task(tmp_path / "few", train_images=2, val_images=1, image_size=64).parent
    many = make_detection_task(tmp_path / "many", train_images=5, val_images=1, image_size=64).parent
    for name in ("images/train/00001.png", "labels/train/00001.txt", "images/val/00000.png"):
        assert (few / name).read_bytes() == (many / name).read_bytes()


def test_pngs_decode_to_the_rendered_pixels_and_the_yaml_names_the_classes(tmp_path):
    data = make_detection_task(tmp_path, train_images=3, val_images=2, image_size=96, seed=1)
    pixels, _ = render_image(96, seed=1, split="val", index=1)
    decoded = Image.open(tmp_path / "images/val/00001.png").convert("RGB").tobytes()
    assert torch.equal(torch.frombuffer(bytearray(decoded), dtype=torch.uint8).view(96, 96, 3), pixels)
    text = data.read_text()
    assert (
        f"path: {tmp_path.resolve()}" in text and "train: images/train" in text and "val: images/val" in text
    )
    assert all(f"  {index}: {name}" in text for index, name in enumerate(CLASSES))


def test_boxes_hold_one_to_six_objects_of_the_promised_size_drawn_in_their_colour():
    size, boxes_seen, coloured = 128, 0, 0
    for index in range(40):
        pixels, boxes = render_image(size, seed=0, split="train", index=index)
        assert 1 <= len(boxes) <= 6
        for cls, x, y, w, h in boxes:
            assert cls in range(len(CLASSES))
            assert 8 <= w * size <= 48 and 8 <= h * size <= 48
            assert 0 <= x - w / 2 and x + w / 2 <= 1 and 0 <= y - h / 2 and y + h / 2 <= 1
            # the box's centre is inside every shape; red objects are reddest there, blue ones bluest
            strongest = pixels[int(y * size), int(x * size)].argmax().item()
            boxes_seen += 1
            coloured += strongest == torch.tensor(list(COLOURS.values())[cls // 3]).argmax().item()
    # a later object or a decoy may cover a centre now and then, never often
    assert coloured >= 0.9 * boxes_seen


def test_bad_sizes_are_one_line_errors(tmp_path):
    with pytest.raises(InputSpecError, match="image_size=32"):
        make_detection_task(tmp_path, image_size=32)
    with pytest.raises(InputSpecError, match="val_images=0"):
        make_detection_task(tmp_path, train_images=2, val_images=0)
