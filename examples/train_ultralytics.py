"""Train a slim-neck YOLOv8 with ultralytics' own trainer: its loss, data loading, validation and checkpoints.

    pip install -c constraints.txt -e '.[ultralytics]'
    python examples/train_ultralytics.py --data coco8.yaml --epochs 100 --imgsz 640      # your dataset YAML
    python examples/train_ultralytics.py --model yolov8n.pt --data my.yaml               # pretrained: a local .pt
    python examples/train_ultralytics.py                                                 # a 1-epoch offline demo

With no ``--data``, it writes a tiny instance of the generated detection task (``rewrite.datasets``: coloured
shapes on noisy backgrounds, with YOLO labels) to a temporary folder and trains one epoch at 64x64 on the CPU,
offline: a check that everything is wired, not a detector.
The rule set defaults to the built-in ``slim-neck-v8`` where this version has it, else to
``examples/rules/yolov8-neck-gsconv.toml`` (the two neck downsampling convs become GSConvs). Any other
``key=value`` argument goes to ultralytics' train as it is (``batch=16 device=0 workers=8 patience=50``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="yolov8n.yaml", help="a model YAML, or a local .pt for its weights"
    )
    parser.add_argument(
        "--rules", help="rule set name or TOML file (default: slim-neck-v8, else the example's)"
    )
    parser.add_argument("--data", help="dataset YAML (default: a generated demo dataset, offline)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--imgsz", type=int, default=None, help="default: 640, or 64 for the demo")
    parser.add_argument("extra", nargs="*", help="key=value arguments for ultralytics' train")
    args = parser.parse_args(argv)

    demo = args.data is None
    if demo:  # before ultralytics is imported: it reads these then
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="rewrite-ultralytics-"))
    import rewrite
    from rewrite.integrations.ultralytics import train

    root = Path(tempfile.mkdtemp(prefix="rewrite-demo-")) if demo else None
    data = str(demo_dataset(root)) if demo else args.data
    rules = args.rules or (
        "slim-neck-v8"
        if "slim-neck-v8" in rewrite.builtin_rule_sets()
        else HERE / "rules/yolov8-neck-gsconv.toml"
    )
    options = (
        {"device": "cpu", "workers": 0, "batch": 2, "plots": False, "project": str(root / "runs")}
        if demo
        else {}
    )
    options.update(parse_extra(args.extra))

    yolo = train(
        model=args.model,
        rules=rules,
        data=data,
        epochs=args.epochs,
        imgsz=args.imgsz or (64 if demo else 640),
        **options,
    )
    checkpoint = yolo.trainer.best if yolo.trainer.best.exists() else yolo.trainer.last
    blocks = sum(isinstance(m, rewrite.GSConv | rewrite.VoVGSCSP) for m in yolo.model.modules())
    print(f"checkpoint: {checkpoint} ({blocks} GS blocks inside)")
    print(f"validation: {yolo.metrics.results_dict if yolo.metrics is not None else None}")


def parse_extra(pairs: list[str]) -> dict[str, object]:
    """``["batch=16", "cos_lr=True"]`` -> ``{"batch": 16, "cos_lr": True}`` (numbers and booleans typed)."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        value: object = {"True": True, "False": False}.get(text, text)
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        options[key] = value
    return options


def demo_dataset(root: Path) -> Path:
    """A small instance of the generated detection task: 8 train and 4 val images at 64 px, labels, data YAML."""
    from rewrite.datasets import make_detection_task

    return make_detection_task(root, train_images=8, val_images=4, image_size=64)


if __name__ == "__main__":
    main()
