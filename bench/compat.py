"""The compatibility table: the built-in rule sets on third-party detectors, as a new user would run them.

For each detector (built from its library's code, no weights): plan with the rule set its family calls for,
apply, run the copy in eval mode, run one training step with backward, fold the copy for inference
(``rewrite.fold``) and check the folded model's outputs, and print one row: family, model, rule set, sites
rewritten, candidates rejected, params and FLOPs before → after, eval / train / fold status. Small scales (n) at
320×320, so that the whole table takes a few minutes on a 2-core CPU.

    python bench/compat.py [--format github|plain] [--only NAME ...]

Needs the ``test`` extra (torchvision, ultralytics). Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import nn
from torch.utils import _pytree as pytree

import rewrite

SIZE = 320


@dataclass(frozen=True)
class Case:
    family: str
    name: str
    rules: str
    build: Callable[[], nn.Module]
    inputs: Callable[[bool], tuple]  # the example inputs, for training (True) or eval
    scope: str | None = None  # None: the rule set's own
    # Its eval outputs are selected detections (a score threshold, NMS or a top-k): a rounding difference may
    # select another one, so the folded model's outputs are compared by structure only.
    selects: bool = False


def _ultralytics(config: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ultralytics.nn import tasks
        from ultralytics.utils import LOGGER

        LOGGER.setLevel(logging.ERROR)  # its notes on guessed scales and tasks are not this table's business
        stem = config.removesuffix(".yaml")
        task = next((task for task in ("seg", "pose", "obb") if stem.endswith(f"-{task}")), "detect")
        model_class = {
            "detect": tasks.RTDETRDetectionModel if stem.startswith("rtdetr") else tasks.DetectionModel,
            "seg": tasks.SegmentationModel,
            "pose": tasks.PoseModel,
            "obb": tasks.OBBModel,
        }[task]
        return model_class(config, verbose=False)

    return build


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import detection

        small = {} if name.startswith("ssd") else {"min_size": SIZE, "max_size": SIZE}
        return getattr(detection, name)(weights=None, weights_backbone=None, **small)

    return build


def _image_batch(training: bool) -> tuple:
    return (torch.rand(2 if training else 1, 3, SIZE, SIZE),)


def _image_list(training: bool, *, masks: bool = False, keypoints: bool = False) -> tuple:
    # two images to train on: a batch of one has 1x1 maps deep in SSD, where BatchNorm cannot train
    images = [torch.rand(3, SIZE, SIZE) for _ in range(2 if training else 1)]
    if not training:
        return (images,)
    target = {"boxes": torch.tensor([[20.0, 30.0, 120.0, 160.0]]), "labels": torch.tensor([1])}
    if masks:  # Mask R-CNN trains on the object's pixels: here the whole box
        target["masks"] = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
        target["masks"][:, 30:160, 20:120] = 1
    if keypoints:  # Keypoint R-CNN: 17 visible points (x, y, visibility) inside the box
        target["keypoints"] = torch.tensor([[[20.0 + 5 * k, 30.0 + 7 * k, 1.0] for k in range(17)]])
    return (images, [target] * len(images))


def _torchvision_case(
    name: str,
    rules: str = "torchvision-fpn-gsconv",
    inputs: Callable[[bool], tuple] = _image_list,
    scope: str | None = None,
) -> Case:
    # In eval mode a torchvision detector returns its detections after a score threshold and NMS.
    return Case("torchvision", name, rules, _torchvision(name), inputs, scope, selects=True)


CASES = [
    _torchvision_case("fasterrcnn_resnet50_fpn"),
    _torchvision_case("retinanet_resnet50_fpn"),
    _torchvision_case("fcos_resnet50_fpn"),
    _torchvision_case("retinanet_resnet50_fpn_v2"),
    _torchvision_case("fasterrcnn_mobilenet_v3_large_fpn"),
    _torchvision_case("maskrcnn_resnet50_fpn", inputs=functools.partial(_image_list, masks=True)),
    _torchvision_case("keypointrcnn_resnet50_fpn", inputs=functools.partial(_image_list, keypoints=True)),
    # SSD has no neck: its backbone's dense convs instead
    _torchvision_case("ssdlite320_mobilenet_v3_large", rules="gsconv-only", scope="backbone"),
    Case("ultralytics", "yolov3u", "slim-neck", _ultralytics("yolov3u.yaml"), _image_batch),
    Case("ultralytics", "yolov5nu", "slim-neck", _ultralytics("yolov5nu.yaml"), _image_batch),
    Case("ultralytics", "yolov6n", "slim-neck-v8", _ultralytics("yolov6n.yaml"), _image_batch),
    Case("ultralytics", "yolov8n", "slim-neck-v8", _ultralytics("yolov8n.yaml"), _image_batch),
    Case("ultralytics", "yolov8n-seg", "slim-neck-v8", _ultralytics("yolov8n-seg.yaml"), _image_batch),
    Case("ultralytics", "yolov8n-pose", "slim-neck-v8", _ultralytics("yolov8n-pose.yaml"), _image_batch),
    Case("ultralytics", "yolov8n-obb", "slim-neck-v8", _ultralytics("yolov8n-obb.yaml"), _image_batch),
    Case("ultralytics", "yolov8n-p2", "slim-neck-v8", _ultralytics("yolov8n-p2.yaml"), _image_batch),
    Case("ultralytics", "yolov8n-p6", "slim-neck-v8", _ultralytics("yolov8n-p6.yaml"), _image_batch),
    Case("ultralytics", "yolov10n", "slim-neck-v8", _ultralytics("yolov10n.yaml"), _image_batch),
    Case("ultralytics", "yolo11n", "slim-neck-v8", _ultralytics("yolo11n.yaml"), _image_batch),
    Case("ultralytics", "yolo11n-seg", "slim-neck-v8", _ultralytics("yolo11n-seg.yaml"), _image_batch),
    Case("ultralytics", "yolo12n", "slim-neck-v8", _ultralytics("yolo12n.yaml"), _image_batch),
    Case("ultralytics", "yolo26n", "slim-neck-v8", _ultralytics("yolo26n.yaml"), _image_batch),
    Case(
        "ultralytics", "rtdetr-l", "slim-neck-v8", _ultralytics("rtdetr-l.yaml"), _image_batch, selects=True
    ),
]


def _status(step: Callable[[], object]) -> str:
    try:
        step()
    except Exception as error:  # noqa: BLE001 -- a row of the table, not a crash of the table
        return f"FAIL: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return "ok"


def _train_step(model: nn.Module, inputs: tuple) -> None:
    model.train()
    out = model(*inputs)
    tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    loss = sum(t.float().pow(2).mean() for t in tensors)
    loss.backward()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {float(loss)}")


def _fold(model: nn.Module, inputs: tuple, *, values: bool) -> None:
    """Fold for inference; the outputs must keep their structure and, with ``values``, their values (1e-4
    relative)."""
    model.eval()
    folded = rewrite.fold(model, inputs)
    with torch.no_grad():
        expected, got = model(*inputs), folded(*inputs)
    if pytree.tree_structure(got) != pytree.tree_structure(expected):
        raise AssertionError("the folded model's outputs are structured differently")
    if not values:
        return
    for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected), strict=True):
        if isinstance(b, torch.Tensor) and b.is_floating_point() and b.numel():
            error = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
            if error > 1e-4:
                raise AssertionError(f"folded outputs differ by {error:.1e} (relative)")


def run_case(case: Case) -> list[str]:
    torch.manual_seed(0)
    model = case.build().eval()
    plan = rewrite.plan(model, case.rules, case.inputs(False), scope=case.scope, model_name=case.name)
    slim = plan.apply()

    def evaluate() -> None:
        with torch.no_grad():
            slim.eval()(*case.inputs(False))

    eval_status = _status(evaluate)
    train_status = _status(lambda: _train_step(slim, case.inputs(True)))
    fold_status = _status(lambda: _fold(slim, case.inputs(False), values=not case.selects))
    kinds = "/".join(str(sum(s.kind == kind for s in plan.sites)) for kind in ("module", "modules", "graph"))
    return [
        case.family,
        case.name,
        case.rules + (f" ({case.scope})" if case.scope else ""),
        len(plan.sites),
        kinds,
        len(plan.rejected),
        f"{plan.params.before / 1e6:.2f} M → {plan.params.after / 1e6:.2f} M ({plan.params.percent:+.1f}%)",
        f"{plan.flops.before / 1e9:.2f} G → {plan.flops.after / 1e9:.2f} G ({plan.flops.percent:+.1f}%)"
        + (" *" if plan.needed_real_data else ""),
        eval_status,
        train_status,
        fold_status,
    ]


HEADERS = [
    "family",
    "model",
    "rules",
    "sites",
    "module/modules/graph",
    "rejected",
    "params",
    "FLOPs",
    "eval",
    "train step",
    "fold",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="github", help="a tabulate format (github, plain, ...)")
    parser.add_argument("--only", nargs="*", default=None, help="model names to run (default: all)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # NoMatchWarning and friends: the table says what matched
    rows, failed = [], 0
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        start = time.perf_counter()
        print(
            f"[{len(rows) + 1}/{len(CASES)}] {case.name} with {case.rules} ...", file=sys.stderr, flush=True
        )
        try:
            row = run_case(case)
        except Exception as error:  # noqa: BLE001 -- one detector failing is one row that says so
            row = [
                case.family,
                case.name,
                case.rules,
                "-",
                "-",
                "-",
                "-",
                "-",
                f"FAIL: {rewrite_error(error)}",
                "-",
            ]
        failed += any(str(cell).startswith("FAIL") for cell in row)
        rows.append(row)
        print(f"    {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print(tabulate(rows, HEADERS, tablefmt=args.format))
    print(
        "\n\\* needed real data: how much work follows the detections depends on the weights, so the copy's"
        " FLOPs (new random blocks) differ by what its detector finds; the per-site figures are exact."
    )
    print(f"\n{SIZE}x{SIZE}, torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    return 1 if failed else 0


def rewrite_error(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"


if __name__ == "__main__":
    sys.exit(main())
