"""Fine-tuning a rewritten, trained YOLO with ultralytics: warm start or fresh blocks, rewrite's fine-tune schedule
(``WARM_FINE_TUNE`` / ``FINE_TUNE``) or ultralytics' defaults; the mAP50-95 of each next to the trained model's own.

The trained model is a ``.pt`` checkpoint (``--model``) of an ultralytics detector trained on ``--data``; each
variant rewrites it with ``--rules``, warm-starts the new blocks for ``--warm-start`` seconds on the training
images (or not: fresh blocks) and fine-tunes ``--epochs`` epochs with ``rewrite.integrations.ultralytics.train``,
either with its schedule for trained weights (``WARM_FINE_TUNE`` after a warm start, ``FINE_TUNE`` on fresh
blocks) or with ultralytics' own values of those keys
(``optimizer=auto``, ``lr0=0.01``, ``warmup_epochs=3``). Printed: per variant the final validation's mAP50 and
mAP50-95, their ratio to the base's, the warm start's seconds and the whole run's.

    python bench/ultralytics_fine_tune.py --model best.pt --data data.yaml [--epochs 2] [--warm-start 60]
        [--imgsz 128] [--batch 16] [--rules slim-neck-v8] [--variants warm-fine-tune fresh-fine-tune ...]
        [--fine-tune lr0=0.001 ...]
"""

from __future__ import annotations

import argparse
import ast
import os
import tempfile
import time

VARIANTS = ("warm-fine-tune", "fresh-fine-tune", "warm-ultralytics", "fresh-ultralytics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the trained .pt checkpoint")
    parser.add_argument("--data", required=True, help="its dataset YAML")
    parser.add_argument("--rules", default="slim-neck-v8")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warm-start", type=float, default=60.0, help="seconds")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--fine-tune",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="ultralytics arguments on top of FINE_TUNE in the fine-tune variants (lr0=0.001 ...)",
    )
    args = parser.parse_args()

    os.environ["YOLO_OFFLINE"] = "1"
    from ultralytics import YOLO
    from ultralytics.cfg import DEFAULT_CFG_DICT

    from rewrite.integrations.ultralytics import FINE_TUNE, WARM_FINE_TUNE, train

    common = {
        "data": args.data,
        "imgsz": args.imgsz,
        "batch": args.batch,
        "device": "cpu",
        "workers": 0,
        "plots": False,
        "seed": 0,
        "deterministic": True,
        "verbose": False,
        "project": tempfile.mkdtemp(prefix="rewrite-fine-tune-"),
    }
    base = (
        YOLO(args.model)
        .val(
            data=args.data,
            imgsz=args.imgsz,
            batch=args.batch,
            device="cpu",
            workers=0,
            plots=False,
            verbose=False,
        )
        .box
    )
    ultralytics_schedule = {key: DEFAULT_CFG_DICT[key] for key in FINE_TUNE}
    fine_tune = {key: _literal(value) for key, _, value in (pair.partition("=") for pair in args.fine_tune)}
    rows = []
    for variant in args.variants:
        warm, schedule = variant.split("-", 1)
        start = time.perf_counter()
        yolo = train(
            model=args.model,
            rules=args.rules,
            warm_start=args.warm_start if warm == "warm" else False,
            epochs=args.epochs,
            name=variant,
            **common,
            **(ultralytics_schedule if schedule == "ultralytics" else fine_tune),
        )
        seconds = time.perf_counter() - start
        report = yolo.trainer.warm_start_report
        box = yolo.metrics.box
        rows.append(
            (variant, box.map50, box.map, box.map / base.map, report.seconds if report else 0.0, seconds)
        )
        print(f"{variant}: mAP50-95 {box.map:.4f}", flush=True)

    print(f"\nbase {args.model}: mAP50 {base.map50:.4f}, mAP50-95 {base.map:.4f}")
    print(
        f"fine-tune schedule: after a warm start {WARM_FINE_TUNE | fine_tune}, fresh blocks {FINE_TUNE | fine_tune}; "
        f"ultralytics': {ultralytics_schedule}"
    )
    print(f"{'variant':<18} {'mAP50':>7} {'mAP50-95':>9} {'/ base':>7} {'warm s':>7} {'run s':>7}")
    for variant, map50, map50_95, ratio, warm_seconds, seconds in rows:
        print(f"{variant:<18} {map50:7.4f} {map50_95:9.4f} {ratio:7.3f} {warm_seconds:7.1f} {seconds:7.1f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def _literal(text: str) -> object:
    """``"0.001"`` -> 0.001, ``"True"`` -> True; anything else stays text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


if __name__ == "__main__":
    main()
