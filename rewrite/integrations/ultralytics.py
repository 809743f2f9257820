"""Train a rewritten detector with ultralytics' own trainer, and compare it with the model it came from.

``train`` builds the model as ultralytics would (from a YAML, or from a ``.pt`` checkpoint for trained weights),
rewrites it with a rule set inside ultralytics' documented hook for that — ``DetectionTrainer.get_model`` — and
hands every other keyword to ultralytics' own ``train`` (``data``, ``epochs``, ``imgsz``, ``batch``, ``device``,
``workers``, ``project``, ``name``, ...)::

    from rewrite.integrations.ultralytics import compare, train

    yolo = train(model="yolov8n.yaml", rules="slim-neck-v8", data="coco8.yaml", epochs=100, imgsz=640)
    yolo.trainer.best            # runs/detect/train/weights/best.pt: GSConv / VoVGSCSP inside
    yolo.metrics                 # the validation of the best checkpoint

    # A trained detector: rewrite it, warm-start the new blocks from it for 30 s, then fine-tune 2 epochs.
    slim = train(model="best.pt", rules="slim-neck-v8", warm_start=30, data="my.yaml", epochs=2)
    print(compare("best.pt", slim.trainer.best, data="my.yaml"))   # params, FLOPs, latency, mAP side by side

The rewrite happens on the model ultralytics just built — trained when ``model`` is a ``.pt`` file or
``pretrained=`` names one: the blocks that stay keep those weights, the new blocks start fresh unless
``warm_start`` teaches them first what the blocks they replaced computed (:func:`rewrite.warm_start`, on the
training images, labels unused). The model keeps its class (``DetectionModel``) and attributes, so ultralytics'
loss, EMA, validation and export work on it as they are. The checkpoint pickles the model whole, as ultralytics
always does; the GS blocks are classes of :mod:`rewrite.blocks`, so ``YOLO("best.pt")`` loads it back wherever
``rewrite`` is installed.

A rule set that rewrites nothing in the model is a :class:`~rewrite.errors.NoMatchError` before any training.
This module is the only one that imports ultralytics (the ``ultralytics`` extra).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics import YOLO
from ultralytics.cfg import get_cfg
from ultralytics.data import YOLODataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.utils import DEFAULT_CFG, LOGGER
from ultralytics.utils.checks import check_imgsz
from ultralytics.utils.torch_utils import select_device

from rewrite.errors import InputSpecError, NoMatchError, RewriteError
from rewrite.fold import fold
from rewrite.planner import plan
from rewrite.profiler import profile
from rewrite.report.comparison import Comparison, Measurement
from rewrite.rules import RuleSet, load_rules
from rewrite.warm_start import WarmStartReport, changed_modules, warm_start

__all__ = [
    "FINE_TUNE",
    "WARM_FINE_TUNE",
    "WARM_START_IMAGES",
    "WARM_START_SECONDS",
    "Comparison",
    "Measurement",
    "RewriteTrainer",
    "compare",
    "rewrite_detection_model",
    "train",
    "training_images",
]

Rules = str | Path | RuleSet

# The warm start's time budget when ``warm_start=True``.
WARM_START_SECONDS = 30.0
# How many training images the warm start learns from (spread evenly over the split), and in batches of how many.
WARM_START_IMAGES = 256
_WARM_START_BATCH = 16

# The schedule of a fine-tune that starts from trained weights with fresh new blocks (see train()); the caller's
# keywords win.
FINE_TUNE: dict[str, Any] = {
    "optimizer": "AdamW",
    "lr0": 0.001,
    "warmup_epochs": 0.0,
}
# ... and after a warm start, whose new blocks already compute what the trained ones did: a tenth of the rate.
WARM_FINE_TUNE: dict[str, Any] = {**FINE_TUNE, "lr0": 0.0001}


def train(
    model: str | Path = "yolov8n.yaml",
    rules: Rules = "slim-neck-v8",
    *,
    scope: str | list[str] | None = None,
    warm_start: bool | float = False,
    **kwargs: Any,
) -> YOLO:
    """Train ``model`` rewritten with ``rules`` in ultralytics' trainer; returns the ``YOLO`` object after training.

    ``model`` is what ``ultralytics.YOLO`` takes (a model YAML, or a local ``.pt`` checkpoint whose weights
    the unchanged blocks keep); ``rules`` a rule set as for :func:`rewrite.plan`, ``scope`` its scope override.
    Every other keyword goes to ultralytics' ``YOLO.train``. The returned object holds what ultralytics leaves
    there: ``.trainer`` (``.last`` / ``.best`` checkpoints, ``.tloss``), ``.metrics`` (the final validation) and
    ``.model`` (loaded back from the best checkpoint).

    ``warm_start`` (a number of seconds, or ``True`` for :data:`WARM_START_SECONDS`) needs trained weights:
    before the trainer builds its optimizer and EMA, :func:`rewrite.warm_start` teaches the new blocks, within
    that budget, to compute what the trained blocks they replaced computed, on :data:`WARM_START_IMAGES` images
    of the training split (letterboxed to ``imgsz`` as ultralytics' validation does; their labels unused); the
    training then fine-tunes that model. ultralytics' log says what the warm start did (its sites, the budget,
    the error of each site and of the whole model's outputs before and after), and ``.trainer.warm_start_report``
    holds it (a :class:`rewrite.WarmStartReport`).

    From trained weights (a ``.pt`` checkpoint, or ``pretrained=`` naming one) the training is a fine-tune, and its
    schedule is :data:`WARM_FINE_TUNE` after a warm start and :data:`FINE_TUNE` without one, unless the keywords
    say otherwise: AdamW, no warmup, at ``lr0=0.0001`` and ``0.001``. A warm start leaves the model close to the
    trained one, and AdamW's first steps move every weight by about the learning rate whatever its gradient:
    0.001 undoes most of a warm start in the first epoch, while fresh blocks need it to learn at all.
    ultralytics' own defaults are made for weights from scratch: ``optimizer='auto'`` ignores ``lr0`` and picks a
    rate from the number of classes (0.01 / (4 + classes)), and its warmup (up to 3 epochs, all but the last)
    starts the biases at a rate of 0.1. Pass ``optimizer="auto", warmup_epochs=3.0`` for them. The README's
    "Train and evaluate" says what each schedule measured.

    The rule set is checked on the model first: one that rewrites nothing raises
    :class:`~rewrite.errors.NoMatchError`, and a warm start without trained weights
    :class:`~rewrite.errors.InputSpecError`, before ultralytics starts.
    """
    rule_set = load_rules(rules)
    seconds = _warm_start_budget(warm_start)
    yolo = YOLO(model)
    pretrained = kwargs.get("pretrained", True)
    trained = (bool(yolo.ckpt) and pretrained is not False) or isinstance(pretrained, str | Path)
    if seconds is not None and not trained:
        raise InputSpecError(
            f"train(warm_start={warm_start!r}): {model} has no trained weights to warm-start the new blocks "
            "from; pass model= a trained .pt checkpoint, or leave warm_start out"
        )
    imgsz = kwargs.get("imgsz", 640)
    rewrite_detection_model(yolo.model, rule_set, imgsz=imgsz, scope=scope)  # fail early; the copy is dropped
    trainer = type(
        RewriteTrainer.__name__,
        (RewriteTrainer,),
        {"rules": rule_set, "scope": scope, "warm_start_seconds": seconds},
    )
    schedule = WARM_FINE_TUNE if seconds is not None else FINE_TUNE
    yolo.train(trainer=trainer, **({**schedule, **kwargs} if trained else kwargs))
    return yolo


def _warm_start_budget(warm_start: bool | float | None) -> float | None:
    """The warm start's seconds, or None for none: ``True`` is :data:`WARM_START_SECONDS`.

    >>> _warm_start_budget(True), _warm_start_budget(45), _warm_start_budget(False)
    (30.0, 45.0, None)
    >>> _warm_start_budget(-1)
    Traceback (most recent call last):
    rewrite.errors.InputSpecError: warm_start=-1: pass a positive number of seconds, True for 30 s, or False
    """
    if warm_start is None or warm_start is False:
        return None
    if warm_start is True:
        return WARM_START_SECONDS
    if isinstance(warm_start, int | float) and math.isfinite(warm_start) and warm_start > 0:
        return float(warm_start)
    raise InputSpecError(
        f"warm_start={warm_start!r}: pass a positive number of seconds, True for {WARM_START_SECONDS:g} s, or False"
    )


class RewriteTrainer(DetectionTrainer):
    """A ``DetectionTrainer`` whose model is rewritten with ``rules`` as soon as ultralytics builds it.

    Set ``rules`` (and ``scope``, ``warm_start_seconds``) on a subclass, as :func:`train` does, and pass it as
    ``trainer=`` to ``YOLO.train``. With ``warm_start_seconds``, the new blocks are warm-started from the trained
    model ultralytics built (see :func:`train`) and ``warm_start_report`` says how. Resuming works: a checkpoint
    that already holds the new blocks loads into them, and is not warm-started again.
    """

    rules: Rules = "slim-neck-v8"
    scope: str | list[str] | None = None
    warm_start_seconds: float | None = None
    warm_start_report: WarmStartReport | None = None

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        rewritten = rewrite_detection_model(
            model, self.rules, imgsz=self.args.imgsz, scope=self.scope, verbose=verbose
        )
        # Resuming a run, ``weights`` is the rewritten model itself: its new blocks' weights must load too.
        if weights is not None and not changed_modules(rewritten, weights):
            rewritten.load(weights, verbose=verbose)
        elif self.warm_start_seconds:
            if weights is None:
                raise InputSpecError(
                    "RewriteTrainer.warm_start_seconds: the model has no trained weights to warm-start the new "
                    "blocks from; train from a trained .pt checkpoint"
                )
            self.warm_start_report = self._warm_start(rewritten, model)
        return rewritten

    def _warm_start(self, rewritten: nn.Module, trained: nn.Module) -> WarmStartReport:
        """Warm-start ``rewritten``'s new blocks from ``trained`` on the training images, on the trainer's device,
        and log what it did."""
        stride = max(int(trained.stride.max()), 32)
        imgsz = check_imgsz(self.args.imgsz, stride=stride, floor=stride, max_dim=1)
        batches = training_images(self.data, imgsz, stride=stride)
        rewritten.to(self.device)
        trained.to(self.device)
        images = sum(len(batch) for batch in batches)
        sites = changed_modules(rewritten, trained)
        LOGGER.info(
            f"rewrite warm start: {len(sites)} new block(s) ({', '.join(sites)}) learn from the trained model on "
            f"{images} training image(s) at {imgsz}, labels unused, within {self.warm_start_seconds:g} s"
        )
        report = warm_start(
            rewritten,
            trained,
            [batch.to(self.device) for batch in batches],
            sites=sites,
            seconds=self.warm_start_seconds,
            progress=lambda message: LOGGER.info(f"rewrite warm start: {message}"),
        )
        LOGGER.info(f"rewrite warm start: done in {report.seconds:.1f} s\n{report}")
        return report


def training_images(
    data: str | Path | dict[str, Any],
    imgsz: int,
    *,
    count: int = WARM_START_IMAGES,
    stride: int = 32,
    batch: int = _WARM_START_BATCH,
) -> list[torch.Tensor]:
    """``count`` images of ``data``'s training split, spread evenly over it: RGB in [0, 1], letterboxed to
    ``imgsz`` × ``imgsz`` as ultralytics' validation does, in NCHW batches of ``batch`` — what a warm start learns
    from.

    ``data`` is a data YAML (or the dict ultralytics' ``check_det_dataset`` makes of one). The images come from
    ultralytics' own dataset class on the split it names (a folder, a list file, or several), without
    augmentation; labels are read (and cached) as for training, but not used::

        batches = training_images("my.yaml", 128)
        rewrite.warm_start(slim, base, batches, seconds=30)
    """
    data = data if isinstance(data, dict) else check_det_dataset(str(data))
    dataset = YOLODataset(
        img_path=data["train"],
        imgsz=imgsz,
        augment=False,
        hyp=get_cfg(DEFAULT_CFG),
        rect=False,
        stride=stride,
        prefix="rewrite warm start: ",
        data=data,
        task="detect",
    )
    count = min(count, len(dataset))
    picked = [dataset[index * len(dataset) // count]["img"] for index in range(count)]
    return [torch.stack(picked[i : i + batch]).float() / 255 for i in range(0, count, batch)]


def rewrite_detection_model(
    model: nn.Module,
    rules: Rules,
    *,
    imgsz: int | list[int] = 640,
    scope: str | list[str] | None = None,
    verbose: bool = False,
) -> nn.Module:
    """``model`` (an ultralytics ``DetectionModel``) rewritten with ``rules``: a copy, of the same class.

    Raises :class:`~rewrite.errors.NoMatchError` when nothing is rewritten, and
    :class:`~rewrite.errors.RewriteError` when the rewrite replaced the model's own forward (an fx graph in
    place of the ``DetectionModel``), which ultralytics could not train.
    """
    height, width = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    channels = model.yaml.get("channels", 3) if isinstance(getattr(model, "yaml", None), dict) else 3
    example = torch.zeros(1, channels, height, width, device=next(model.parameters()).device)
    the_plan = plan(model, rules, example, scope=scope)
    if not the_plan.sites:
        raise NoMatchError(
            f"rule set '{the_plan.rule_set}' rewrites nothing in {type(model).__name__} "
            f"({getattr(model, 'yaml_file', '') or 'model'}, scope {the_plan.scope}); nothing to train"
        )
    rewritten = the_plan.apply()
    if type(rewritten) is not type(model):
        raise RewriteError(
            f"rule set '{the_plan.rule_set}' turned {type(model).__name__} into {type(rewritten).__name__}; "
            "ultralytics trains its own model classes only — narrow the scope to the model's layers"
        )
    if verbose:
        changes = ", ".join(f"{site.path} {site.before} → {site.after}" for site in the_plan.sites)
        LOGGER.info(
            f"rewrite: '{the_plan.rule_set}' rewrote {len(the_plan.sites)} site(s), params "
            f"{the_plan.params.before:,} → {the_plan.params.after:,}: {changes}"
        )
    return rewritten


def compare(
    base: str | Path | YOLO,
    slim: str | Path | YOLO,
    *,
    data: str | Path,
    imgsz: int = 640,
    device: str | None = None,
    **kwargs: Any,
) -> Comparison:
    """Measure ``base`` and ``slim`` (checkpoints, or ``YOLO`` objects) the same way, for a side-by-side table.

    Params and FLOPs are counted by :func:`rewrite.profile` at ``imgsz``; latency is the median of 20 forward
    passes of one ``imgsz`` image on ``device`` (ultralytics' device string; default its choice), each model
    folded for inference by :func:`rewrite.fold` (BatchNorm into the convs, the GS shuffles into the weights);
    mAP50 and mAP50-95 come from ultralytics' own validation on ``data``'s validation split, every other keyword
    going to ``YOLO.val`` (``batch``, ``workers``, ``split``, ...). The models are left as they were::

        comparison = compare("best.pt", "slim/weights/best.pt", data="my.yaml", imgsz=128, device="cpu")
        print(comparison)       # a row each: params, FLOPs, latency (ms), mAP50, mAP50-95;
                                # columns base, slim, change, change %
        comparison.slim.map50_95 / comparison.base.map50_95
    """
    chosen = select_device(device if device is not None else "", verbose=False)
    measured = []
    for model in (base, slim):
        yolo = model if isinstance(model, YOLO) else YOLO(model)
        name = str(yolo.overrides.get("model") or type(yolo.model).__name__)
        network = copy.deepcopy(yolo.model).float().eval().to(chosen)
        example = torch.zeros(1, 3, imgsz, imgsz, device=chosen)
        cost = profile(network, (example,)).total
        latency = _latency_ms(fold(network, (example,)), example)
        # As YOLO.val does, on a copy of the model: ultralytics' validation fuses the model it gets in place.
        args = {**yolo.overrides, "rect": True, "plots": False, "verbose": False, **kwargs}
        validator = DetectionValidator(
            args={**args, "data": str(data), "imgsz": imgsz, "device": device, "mode": "val"}
        )
        validator(model=network)
        box = validator.metrics.box
        measured.append(Measurement(name, cost.params, cost.flops, latency, float(box.map50), float(box.map)))
    return Comparison(measured[0], measured[1], str(data), imgsz, str(chosen))


def _latency_ms(model: nn.Module, example: torch.Tensor, runs: int = 20) -> float:
    """The median of ``runs`` timed forward passes, after 3 untimed ones, in milliseconds."""
    times = []
    with torch.inference_mode():
        for run in range(runs + 3):
            if example.device.type == "cuda":
                torch.cuda.synchronize(example.device)
            start = time.perf_counter()
            model(example)
            if example.device.type == "cuda":
                torch.cuda.synchronize(example.device)
            if run >= 3:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)
