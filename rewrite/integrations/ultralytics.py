"""Train a rewritten detector with ultralytics' own trainer: its loss, data loading, validation and checkpoints.

``train`` builds the model as ultralytics would (from a YAML, or from a ``.pt`` for pretrained weights), rewrites
it with a rule set inside ultralytics' documented hook for that — ``DetectionTrainer.get_model`` — and hands
every other keyword to ultralytics' own ``train`` (``data``, ``epochs``, ``imgsz``, ``batch``, ``device``,
``workers``, ``project``, ``name``, ...)::

    from rewrite.integrations.ultralytics import train

    yolo = train(model="yolov8n.yaml", rules="slim-neck-v8", data="coco8.yaml", epochs=100, imgsz=640)
    yolo.trainer.best            # runs/detect/train/weights/best.pt: GSConv / VoVGSCSP inside
    yolo.metrics                 # the validation of the best checkpoint

The rewrite happens on the model ultralytics just built — pretrained when ``model`` is a ``.pt`` file or
``pretrained=`` names one: the blocks that stay keep those weights, the new blocks start fresh. The model keeps
its class (``DetectionModel``) and attributes, so ultralytics' loss, EMA, validation and export work on it as
they are. The checkpoint pickles the model whole, as ultralytics always does; the GS blocks are classes of
:mod:`rewrite.blocks`, so ``YOLO("best.pt")`` loads it back wherever ``rewrite`` is installed.

A rule set that rewrites nothing in the model is a :class:`~rewrite.errors.NoMatchError` before any training.
This module is the only one that imports ultralytics (the ``ultralytics`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import LOGGER

from rewrite.errors import NoMatchError, RewriteError
from rewrite.planner import plan
from rewrite.rules import RuleSet, load_rules
from rewrite.warm_start import changed_modules

__all__ = ["RewriteTrainer", "rewrite_detection_model", "train"]

Rules = str | Path | RuleSet


def train(
    model: str | Path = "yolov8n.yaml",
    rules: Rules = "slim-neck-v8",
    *,
    scope: str | list[str] | None = None,
    **kwargs: Any,
) -> YOLO:
    """Train ``model`` rewritten with ``rules`` in ultralytics' trainer; returns the ``YOLO`` object after training.

    ``model`` is what ``ultralytics.YOLO`` takes (a model YAML, or a local ``.pt`` checkpoint whose weights
    the unchanged blocks keep); ``rules`` a rule set as for :func:`rewrite.plan`, ``scope`` its scope override.
    Every other keyword goes to ultralytics' ``YOLO.train`` unchanged. The returned object holds what ultralytics
    leaves there: ``.trainer`` (``.last`` / ``.best`` checkpoints, ``.tloss``), ``.metrics`` (the final
    validation) and ``.model`` (loaded back from the best checkpoint).

    The rule set is checked on the model first: one that rewrites nothing raises
    :class:`~rewrite.errors.NoMatchError` before ultralytics starts.
    """
    rule_set = load_rules(rules)
    yolo = YOLO(model)
    imgsz = kwargs.get("imgsz", 640)
    rewrite_detection_model(yolo.model, rule_set, imgsz=imgsz, scope=scope)  # fail early; the copy is dropped
    trainer = type(RewriteTrainer.__name__, (RewriteTrainer,), {"rules": rule_set, "scope": scope})
    yolo.train(trainer=trainer, **kwargs)
    return yolo


class RewriteTrainer(DetectionTrainer):
    """A ``DetectionTrainer`` whose model is rewritten with ``rules`` as soon as ultralytics builds it.

    Set ``rules`` (and ``scope``) on a subclass, as :func:`train` does, and pass it as ``trainer=`` to
    ``YOLO.train``. Resuming works: a checkpoint that already holds the new blocks loads into them.
    """

    rules: Rules = "slim-neck-v8"
    scope: str | list[str] | None = None

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        rewritten = rewrite_detection_model(
            model, self.rules, imgsz=self.args.imgsz, scope=self.scope, verbose=verbose
        )
        # Resuming a run, ``weights`` is the rewritten model itself: its new blocks' weights must load too.
        if weights is not None and not changed_modules(rewritten, weights):
            rewritten.load(weights, verbose=verbose)
        return rewritten


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
