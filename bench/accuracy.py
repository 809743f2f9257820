"""Does a slim-neck detector detect as well as its base, and how fast does a trained base become a slim one?

Everything runs through ultralytics' own trainer and validator, on the detection task ``rewrite.datasets``
generates (6 shape/colour classes, ``--train-images`` / ``--val-images`` images at ``--imgsz`` px, seed 0), on
the CPU. Three parts, each printed as a table:

1. **From scratch** — per family, the base and its slim-neck copy trained with the same recipe (``--epochs``,
   one run per seed): YOLOv8n (``yolov8n.yaml``) with ``slim-neck-v8`` on ``--seeds``, YOLOv5nu (ultralytics'
   ``yolov5n.yaml``) with ``slim-neck`` on ``--v5-seeds``. mAP50 and mAP50-95 of each run's best checkpoint
   (mean and spread over the seeds) and seconds per epoch (training and that epoch's validation, the median
   over the run's epochs, from ultralytics' ``results.csv``).
2. **The paper's table** — params and FLOPs at 640 (``rewrite.profile``), CPU latency at 640 of the seed-0
   checkpoints, folded (``rewrite.fold``), eager and ONNX Runtime (interleaved, medians), next to the mAPs.
3. **From a trained base** — the seed-0 YOLOv8n rewritten with ``slim-neck-v8``, then either warm-started for
   each of the ``--warm-start`` budgets (``rewrite.warm_start`` on 256 training images, labels unused) or left with fresh
   blocks, and fine-tuned K epochs with ``rewrite.integrations.ultralytics.train`` and its ``FINE_TUNE``
   schedule, for K = 0 (no fine-tune), 1, 2 and 10 % of ``--epochs``: mAP50-95 against the wall time from the
   trained checkpoint to the slim one.

Each finished run is recorded in ``OUT/results.json``; running the bench again with the same ``OUT`` skips it,
so an interrupted run resumes and ``--plot`` can redraw from the record alone. The seeds and each run's wall
time are in the tables. ``--plot`` writes ``OUT/accuracy.png``: mAP50-95 against wall time, warm start and fresh
blocks, with the base's and the scratch-trained slim's levels.

    python bench/accuracy.py --out runs/accuracy [--epochs 20] [--seeds 0,1,2] [--v5-seeds 0] [--imgsz 128]
        [--warm-start 30,60] [--fine-tune KEY=VALUE ...] [--parts scratch,paper,trained] [--plot]

Goals (issue 20): from scratch, slim-neck within 1.0 point of the base's mAP50-95 (mean of the seeds) in both
families; from a trained base, at least 99 % of its mAP50-95 after a warm start of at most 60 s and a fine-tune
of at most 10 % of its epochs, clearly above the same fine-tune from fresh blocks; a slim epoch no slower than a
base epoch.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import functools
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils import LOGGER

import rewrite
from rewrite.datasets import make_detection_task
from rewrite.integrations.ultralytics import (
    FINE_TUNE,
    WARM_FINE_TUNE,
    rewrite_detection_model,
    train,
    training_images,
)

sys.path.insert(0, str(Path(__file__).parent))
from latency import _interleaved, _onnxruntime_session

# family: (ultralytics model YAML, slim-neck rule set)
FAMILIES = {"yolov8n": ("yolov8n.yaml", "slim-neck-v8"), "yolov5nu": ("yolov5n.yaml", "slim-neck")}
TRAINED_FAMILY = "yolov8n"
LATENCY_SIZE = 640


class Record:
    """The finished runs, by name, kept in a JSON file as they finish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def get_or_run(self, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if name not in self.runs:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            start = time.perf_counter()
            result = run()
            result.setdefault("wall_s", time.perf_counter() - start)
            result["load_average"] = os.getloadavg()[0]
            self.runs[name] = result
            self.path.write_text(json.dumps(self.runs, indent=1))
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {_summary(result)}", flush=True)
        return self.runs[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="a folder for the task, the runs and the record"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2", help="YOLOv8n's training seeds")
    parser.add_argument("--v5-seeds", default="0", help="YOLOv5nu's training seeds")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument(
        "--warm-start", default="30,60", help="the warm start's budgets in seconds, comma separated"
    )
    parser.add_argument(
        "--fine-tune",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="ultralytics arguments over FINE_TUNE in part 3 (lr0=0.0002 ...); recorded as runs of their own",
    )
    parser.add_argument("--parts", default="scratch,paper,trained")
    parser.add_argument("--latency-runs", type=int, default=15)
    parser.add_argument("--plot", action="store_true", help="write OUT/accuracy.png")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    seeds = {"yolov8n": _ints(args.seeds), "yolov5nu": _ints(args.v5_seeds)}
    budgets = [float(value) for value in args.warm_start.split(",") if value]

    args.out.mkdir(parents=True, exist_ok=True)
    record = Record(args.out / "results.json")
    data_yaml = args.out / "task" / "data.yaml"
    if not data_yaml.exists():
        make_detection_task(
            args.out / "task",
            train_images=args.train_images,
            val_images=args.val_images,
            image_size=args.imgsz,
        )
    data = str(data_yaml)
    common = {
        "data": data,
        "imgsz": args.imgsz,
        "batch": args.batch,
        "device": "cpu",
        "workers": 0,
        "plots": False,
        "deterministic": True,
        "verbose": False,
        "project": str(args.out / "runs"),
        "exist_ok": True,
    }
    LOGGER.setLevel("WARNING")
    print(
        f"task: {args.train_images} train / {args.val_images} val images at {args.imgsz} px ({data}); "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    started = time.perf_counter()

    def scratch(family: str, variant: str, seed: int) -> dict[str, Any]:
        yaml, rules = FAMILIES[family]
        name = f"{family}-{variant}-seed{seed}"
        return record.get_or_run(
            f"scratch/{family}/{variant}/seed{seed}",
            lambda: _trained_result(
                _trained_base(yaml, **common, epochs=args.epochs, seed=seed, name=name)
                if variant == "base"
                else train(model=yaml, rules=rules, **common, epochs=args.epochs, seed=seed, name=name),
            ),
        )

    if parts & {"scratch", "paper", "trained"}:
        for family, family_seeds in seeds.items():
            for seed in family_seeds:
                for variant in ("base", "slim"):
                    if "scratch" in parts or seed == family_seeds[0]:
                        scratch(family, variant, seed)
    if "paper" in parts:
        for family in FAMILIES:
            for variant in ("base", "slim"):
                checkpoint = record.runs[f"scratch/{family}/{variant}/seed{seeds[family][0]}"]["checkpoint"]
                record.get_or_run(
                    f"paper/{family}/{variant}",
                    functools.partial(_cost_and_latency, checkpoint, args.latency_runs),
                )
    if "trained" in parts:
        base = record.runs[f"scratch/{TRAINED_FAMILY}/base/seed{seeds[TRAINED_FAMILY][0]}"]["checkpoint"]
        rules = FAMILIES[TRAINED_FAMILY][1]
        overrides = {
            key: _literal(value) for key, _, value in (pair.partition("=") for pair in args.fine_tune)
        }
        schedule = "".join(f",{key}={value}" for key, value in overrides.items())
        for epochs in _fine_tune_epochs(args.epochs):
            for budget in [*budgets, False]:
                kind = f"warm{budget:g}" if budget else "fresh"
                if epochs == 0 and schedule:
                    continue
                if epochs == 0:
                    run = functools.partial(_rewritten_alone, base, rules, data, args.imgsz, budget)
                else:
                    run = functools.partial(
                        _fine_tuned,
                        model=base,
                        rules=rules,
                        warm_start=budget,
                        **common,
                        epochs=epochs,
                        seed=0,
                        name=f"trained-{kind}-{epochs}{schedule}",
                        **overrides,
                    )
                record.get_or_run(f"trained/{kind}{schedule}/{epochs}", run)

    print(
        f"\nbench wall time this run: {time.perf_counter() - started:.0f} s; recorded runs' wall time: "
        f"{sum(run['wall_s'] for run in record.runs.values()):.0f} s"
    )
    print_tables(record.runs, seeds, args.epochs)
    if args.plot:
        plot(record.runs, seeds, args.out / "accuracy.png")


def _literal(text: str) -> object:
    """``"0.001"`` -> 0.001, ``"True"`` -> True; anything else stays text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def _fine_tune_epochs(epochs: int) -> list[int]:
    """0 (no fine-tune), 1, 2 and 10 % of the base's epochs."""
    return sorted({0, 1, 2, max(1, round(epochs / 10))})


def _trained_base(model: str, **kwargs: Any) -> YOLO:
    """``model`` trained by ultralytics as it is; the ``YOLO`` object after training (as ``train`` returns)."""
    yolo = YOLO(model)
    yolo.train(**kwargs)
    return yolo


def _trained_result(yolo: YOLO) -> dict[str, Any]:
    """What a training run measured: its best checkpoint's validation, and its seconds per epoch."""
    box = yolo.metrics.box
    trainer = yolo.trainer
    with open(Path(trainer.save_dir) / "results.csv") as file:
        elapsed = [0.0] + [float(row["time"]) for row in csv.DictReader(file)]
    per_epoch = [after - before for before, after in itertools.pairwise(elapsed)]
    return {
        "map50": float(box.map50),
        "map50_95": float(box.map),
        "seconds_per_epoch": statistics.median(per_epoch),
        "epochs": len(per_epoch),
        "checkpoint": str(trainer.best),
    }


def _fine_tuned(**kwargs: Any) -> dict[str, Any]:
    """``rewrite.integrations.ultralytics.train(**kwargs)``: what it measured, and the warm start's seconds."""
    yolo = train(**kwargs)
    result = _trained_result(yolo)
    report = yolo.trainer.warm_start_report
    result["warm_start_s"] = report.seconds if report else 0.0
    return result


def _rewritten_alone(base: str, rules: str, data: str, imgsz: int, budget: float | bool) -> dict[str, Any]:
    """The trained base rewritten, warm-started for ``budget`` seconds (or not), validated without training."""
    start = time.perf_counter()
    trained = YOLO(base).model.float().eval()
    slim = rewrite_detection_model(trained, rules, imgsz=imgsz)
    warm_seconds = 0.0
    if budget:
        report = rewrite.warm_start(slim, trained, training_images(data, imgsz), seconds=float(budget))
        warm_seconds = report.seconds
    wall = time.perf_counter() - start
    map50, map50_95 = _validated(slim, data, imgsz)
    return {"map50": map50, "map50_95": map50_95, "warm_start_s": warm_seconds, "wall_s": wall}


def _validated(model: torch.nn.Module, data: str, imgsz: int) -> tuple[float, float]:
    """mAP50 and mAP50-95 by ultralytics' validator, on a copy (the validator fuses the model it gets)."""
    validator = DetectionValidator(
        args={
            "data": data,
            "imgsz": imgsz,
            "batch": 32,
            "device": "cpu",
            "workers": 0,
            "plots": False,
            "verbose": False,
            "mode": "val",
            "rect": True,
        }
    )
    validator(model=copy.deepcopy(model).eval())
    return float(validator.metrics.box.map50), float(validator.metrics.box.map)


def _cost_and_latency(checkpoint: str, runs: int) -> dict[str, Any]:
    """Params and FLOPs at 640, and the median latency at 640 folded, eager and ONNX Runtime."""
    model = YOLO(checkpoint).model.float().eval()
    x = torch.rand(1, 3, LATENCY_SIZE, LATENCY_SIZE)
    cost = rewrite.profile(model, (x,)).total
    folded = rewrite.fold(model, (x,))
    session = _onnxruntime_session(model, x, _session_options(), torch.get_num_threads())
    feed = {session.get_inputs()[0].name: x.numpy()}
    times = _interleaved(
        {"eager": lambda: folded(x), "onnxruntime": lambda: session.run(None, feed)}, runs, time.perf_counter
    )
    return {
        "params": cost.params,
        "flops": cost.flops,
        **{f"latency_{mode}_ms": 1000 * statistics.median(values) for mode, values in times.items()},
    }


def _session_options() -> object:
    import onnxruntime

    return onnxruntime.SessionOptions()


def _summary(result: dict[str, Any]) -> str:
    shown = {key: value for key, value in result.items() if key not in {"checkpoint", "load_average"}}
    return ", ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in shown.items()
    )


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_tables(runs: dict[str, dict[str, Any]], seeds: dict[str, list[int]], epochs: int) -> None:
    """The three tables, as markdown, from whatever the record holds."""
    print(f"\n## From scratch, same recipe ({epochs} epochs)\n")
    print("| model | seeds | mAP50 | mAP50-95 | per seed | s / epoch | wall s |")
    print("|---|---|---:|---:|---|---:|---:|")
    for family in FAMILIES:
        for variant in ("base", "slim"):
            found = [
                (s, runs[key])
                for s in seeds[family]
                if (key := f"scratch/{family}/{variant}/seed{s}") in runs
            ]
            if not found:
                continue
            scores = [run["map50_95"] for _, run in found]
            print(
                f"| {family} {variant} | {','.join(str(s) for s, _ in found)} | "
                f"{_mean_spread([run['map50'] for _, run in found])} | {_mean_spread(scores)} | "
                f"{' '.join(f'{score:.3f}' for score in scores)} | "
                f"{statistics.mean(run['seconds_per_epoch'] for _, run in found):.1f} | "
                f"{sum(run['wall_s'] for _, run in found):.0f} |"
            )

    print(
        f"\n## The paper's table (params and FLOPs at {LATENCY_SIZE}, CPU latency at {LATENCY_SIZE}, folded)\n"
    )
    print("| model | params | GFLOPs | eager ms | ONNX Runtime ms | mAP50 | mAP50-95 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for family in FAMILIES:
        for variant in ("base", "slim"):
            cost = runs.get(f"paper/{family}/{variant}")
            found = [runs[k] for s in seeds[family] if (k := f"scratch/{family}/{variant}/seed{s}") in runs]
            if cost is None or not found:
                continue
            print(
                f"| {family} {variant} | {cost['params']:,} | {cost['flops'] / 1e9:.2f} | "
                f"{cost['latency_eager_ms']:.1f} | {cost['latency_onnxruntime_ms']:.1f} | "
                f"{statistics.mean(r['map50'] for r in found):.3f} | {statistics.mean(r['map50_95'] for r in found):.3f} |"
            )

    base = runs.get(f"scratch/{TRAINED_FAMILY}/base/seed{seeds[TRAINED_FAMILY][0]}")
    trained = sorted(
        (int(key.split("/")[2]), key.split("/")[1], run)
        for key, run in runs.items()
        if key.startswith("trained/")
    )
    if base is None or not trained:
        return
    print(
        f"\n## From the trained {TRAINED_FAMILY} (seed {seeds[TRAINED_FAMILY][0]}, mAP50-95 {base['map50_95']:.3f}):"
        " rewrite, warm start (warmN: N seconds) or fresh blocks, fine-tune K epochs with train()'s schedule "
        f"(WARM_FINE_TUNE {WARM_FINE_TUNE} after a warm start, FINE_TUNE {FINE_TUNE} on fresh blocks; a run's "
        "overrides in its name)\n"
    )
    print("| K | blocks | warm start s | wall s | mAP50 | mAP50-95 | of base |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for epochs_k, kind, run in trained:
        print(
            f"| {epochs_k} | {kind} | {run['warm_start_s']:.1f} | {run['wall_s']:.0f} | {run['map50']:.3f} | "
            f"{run['map50_95']:.3f} | {100 * run['map50_95'] / max(base['map50_95'], 1e-9):.1f} % |"
        )


def plot(runs: dict[str, dict[str, Any]], seeds: dict[str, list[int]], path: Path) -> None:
    """mAP50-95 against wall time from the trained base, warm start and fresh blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = runs[f"scratch/{TRAINED_FAMILY}/base/seed{seeds[TRAINED_FAMILY][0]}"]
    figure, axes = plt.subplots(figsize=(10, 4.5))
    kinds = sorted(
        {key.split("/")[1] for key in runs if key.startswith("trained/")}, key=lambda k: k != "fresh"
    )
    for kind in kinds:
        # A schedule's line starts where its fine-tune starts: the same warm start (or none), no epochs.
        starts = {kind, kind.split(",")[0]}
        points = sorted(
            (run["wall_s"], run["map50_95"], int(epochs))
            for key, run in runs.items()
            if key.startswith("trained/")
            for _, run_kind, epochs in [key.split("/")]
            if run_kind == kind or (epochs == "0" and run_kind in starts)
        )
        warm, _, overrides = kind.partition(",")
        label = "fresh blocks" if warm == "fresh" else f"warm start {warm[4:]} s"
        label += f", fine-tune {overrides or 'with the default schedule'}"
        axes.plot(
            [p[0] for p in points], [p[1] for p in points], "s--" if kind == "fresh" else "o-", label=label
        )
        for seconds, score, epochs in points:
            axes.annotate(
                f"K={epochs}", (seconds, score), textcoords="offset points", xytext=(4, -10), fontsize=8
            )
    axes.axhline(base["map50_95"], color="black", linewidth=1, label=f"trained base {base['map50_95']:.3f}")
    axes.axhline(0.99 * base["map50_95"], color="grey", linestyle=":", linewidth=1, label="99 % of the base")
    slim = [
        runs[k]["map50_95"]
        for s in seeds[TRAINED_FAMILY]
        if (k := f"scratch/{TRAINED_FAMILY}/slim/seed{s}") in runs
    ]
    if slim:
        axes.axhline(
            statistics.mean(slim),
            color="tab:green",
            linestyle="-.",
            linewidth=1,
            label=f"slim-neck from scratch {statistics.mean(slim):.3f}",
        )
    axes.set_xlabel("wall seconds from the trained checkpoint (2-core CPU)")
    axes.set_ylabel("mAP50-95 (val)")
    axes.set_title(f"{TRAINED_FAMILY} → slim-neck: warm start against fresh blocks")
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
