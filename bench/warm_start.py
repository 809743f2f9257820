"""What a warm start gives back of a trained detector's mAP, no labels, within a time budget (CPU).

The base is a trained ultralytics YOLOv8n checkpoint (``--weights``, e.g. ``runs/detect/train/weights/best.pt``)
and its data YAML (``--data``). The bench rewrites the base with ``slim-neck-v8`` (fresh GS blocks in the
neck), loads ``--images`` training images the way ultralytics feeds them (letterboxed to ``--imgsz``, RGB,
floats in [0, 1], NCHW) and, for each budget of ``--budgets``, warm-starts a fresh copy of the rewritten model
on them with ``rewrite.warm_start(slim, base, batches, sites=plan, seconds=budget)`` — its defaults, no labels.
Every model is then validated by ultralytics' own validator on the data's val split (``YOLO.val``), and the
bench prints, per run, mAP50-95, mAP50, its share of the base's mAP50-95, the warm start's wall time and the
whole model's relative output error before → after (what the warm start optimises, for comparison), with the
load average before and after (the CPU may be shared: the budget is wall time).

Goal (issue 20): with the defaults, no labels, at least 97 % of the base's mAP50-95 within 30 s on a 2-core
CPU.

    python bench/warm_start.py --weights best.pt --data data.yaml [--budgets 10,20,30,60] [--images 256]
                               [--imgsz 128] [--batch 16] [--threads N]

The task the figures in bench/README.md come from is ``rewrite.datasets`` ' generated detection task (6
shape/colour classes at 128 px, 1000 train / 200 val images, seed 0) and a YOLOv8n trained on it from scratch
by ultralytics for 20 epochs, seed 0.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox
from ultralytics.data.utils import check_det_dataset
from ultralytics.utils import LOGGER

import rewrite


def training_images(data: str, count: int, size: int) -> torch.Tensor:
    """The first ``count`` training images of ``data``, letterboxed to ``size`` as ultralytics does: RGB, [0, 1]."""
    folder = Path(check_det_dataset(data)["train"])
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    letterbox = LetterBox(new_shape=(size, size), auto=False, scaleup=True)
    images = [letterbox(image=cv2.imread(str(path)))[..., ::-1] for path in files[:count]]  # BGR -> RGB
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255


def validated(yolo: YOLO, model: nn.Module, data: str, imgsz: int) -> tuple[float, float]:
    """mAP50-95 and mAP50 of ``model`` by ultralytics' validator (on a copy: the validator fuses layers)."""
    yolo.model = copy.deepcopy(model).eval()
    metrics = yolo.val(data=data, imgsz=imgsz, batch=32, workers=0, plots=False, verbose=False)
    return float(metrics.box.map), float(metrics.box.map50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a trained ultralytics detection checkpoint (.pt)")
    parser.add_argument("--data", required=True, help="its data YAML")
    parser.add_argument(
        "--budgets", default="10,20,30,60", help="warm-start budgets in seconds, comma separated"
    )
    parser.add_argument("--images", type=int, default=256, help="training images the warm start sees")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="images per warm-start batch")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (on a CPU shared with other jobs, 1 waits less: the budget is wall time)",
    )
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",") if b]

    LOGGER.setLevel("WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    yolo = YOLO(args.weights)
    base = yolo.model.float().eval()
    the_plan = rewrite.plan(base, "slim-neck-v8", torch.zeros(1, 3, args.imgsz, args.imgsz))
    slim = the_plan.apply()
    batches = list(training_images(args.data, args.images, args.imgsz).split(args.batch))
    print(
        f"{Path(args.weights).name}, slim-neck-v8 ({len(the_plan.sites)} sites), {args.images} training images at "
        f"{args.imgsz} px in batches of {args.batch}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s); load average {os.getloadavg()[0]:.2f}"
    )

    rows = []
    base_map, base_map50 = validated(yolo, base, args.data, args.imgsz)
    rows.append(("base", base_map, base_map50, "", ""))
    fresh_map, fresh_map50 = validated(yolo, slim, args.data, args.imgsz)
    rows.append(("rewritten, no warm start", fresh_map, fresh_map50, "", ""))
    for budget in budgets:
        model = copy.deepcopy(slim)
        start = time.perf_counter()
        report = rewrite.warm_start(model, base, batches, sites=the_plan, seconds=budget)
        wall = time.perf_counter() - start
        steps = sum(site.steps for site in report.sites)
        print(
            f"budget {budget:g} s: {wall:.1f} s, {steps} site step(s), {report.end_to_end_steps} end-to-end, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        score, score50 = validated(yolo, model, args.data, args.imgsz)
        rows.append(
            (
                f"warm start, seconds={budget:g}",
                score,
                score50,
                f"{wall:.1f} s",
                f"{report.model_before:.4f} → {report.model_after:.4f}",
            )
        )

    print("\n| run | mAP50-95 | of base | mAP50 | wall | output error |\n|---|---:|---:|---:|---:|---|")
    for name, score, score50, wall, error in rows:
        print(
            f"| {name} | {score:.3f} | {100 * score / base_map if base_map else 0:.1f} % | {score50:.3f} | {wall} | {error} |"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
