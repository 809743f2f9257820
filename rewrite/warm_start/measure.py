"""Recording what modules compute, and how far apart two outputs are: the relative errors warm start reports
and the losses it trains on."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rewrite.warm_start.hooks import forward_hooks, modes_kept
from rewrite.warm_start.sites import BlockSite

# The batches (or a site's calls) that the checks run on (the whole model's error after a phase, a block's before
# and after a fit, its statistics): the first few tell as well as all of them, for a fraction of the time.
CHECKED = 8


def record(
    model: nn.Module, sites: list[BlockSite], inputs: list[tuple], *, in_original: bool
) -> tuple[dict[str, list[tuple[tuple, Any]]], list[Any]]:
    """Run ``model`` on every batch: each site's calls (positional inputs, output: in the original, what the
    site's modules compute together) and the model's outputs."""
    calls: dict[str, list[tuple[tuple, Any]]] = {site.path: [] for site in sites}

    def recorder(path: str, module: nn.Module, args: tuple, output: Any) -> None:
        # Copies: the forward may go on to change either in place (`out += identity`, an in-place ReLU).
        calls[path].append((copied_values(args), copied_values(output)))

    with forward_hooks({site.path: model.get_submodule(site.path) for site in sites}, after=recorder):
        outputs = [detached(model(*x)) for x in inputs]
    if in_original:  # a chain's rest runs after the hooks are gone (a module of it may be called elsewhere)
        for site in sites:
            calls[site.path] = [(args, detached(site.target(output))) for args, output in calls[site.path]]
    return calls, outputs


def errors_in_place(
    rewritten: nn.Module,
    sites: list[BlockSite],
    inputs: list[tuple],
    calls: dict[str, list[tuple[tuple, Any]]],
    targets: list[Any],
) -> tuple[dict[str, float], float]:
    """Eval-mode relative errors of each new block inside ``rewritten`` against the original's calls, and of
    the whole model's outputs against the original's."""
    with modes_kept(rewritten), torch.no_grad():
        rewritten.eval()
        seen, outputs = record(rewritten, sites, inputs, in_original=False)
    errors = {}
    for site in sites:
        count = min(len(seen[site.path]), len(calls[site.path]))
        errors[site.path] = relative_error(
            [output for _, output in seen[site.path][:count]],
            [target for _, target in calls[site.path][:count]],
        )
    return errors, relative_error(outputs, targets)


def model_error(model: nn.Module, inputs: list[tuple], targets: list[Any]) -> float:
    with modes_kept(model), torch.no_grad():
        model.eval()
        return relative_error((model(*args) for args in inputs), targets)


def block_error(block: nn.Module, calls: list[tuple[tuple, Any]]) -> float:
    block.eval()
    with torch.no_grad():
        return relative_error((block(*args) for args, _ in calls), [target for _, target in calls])


def relative_error(outputs: Iterable[Any], targets: list[Any]) -> float:
    """The root mean, over the tensors an output holds, of ``||output - target||² / ||target||²`` per tensor,
    each summed over all batches.

    Per tensor, not over all of them as one vector: a detector's outputs hold boxes decoded in pixels beside
    raw maps and class scores, and the pixel coordinates would outweigh everything else by orders of magnitude.
    """
    difference: dict[int, float] = {}
    reference: dict[int, float] = {}
    for output, target in zip(outputs, targets, strict=True):
        for k, (new, old) in enumerate(zip(tensors(output), tensors(target), strict=True)):
            difference[k] = difference.get(k, 0.0) + float((new.float() - old.float()).square().sum())
            reference[k] = reference.get(k, 0.0) + float(old.float().square().sum())
    ratios = [d / reference[k] if reference[k] else d for k, d in difference.items()]
    return math.sqrt(sum(ratios) / len(ratios)) if ratios else 0.0


def squared_relative(output: Any, target: Any, references: list[Tensor] | None = None) -> Tensor:
    """The mean, over the tensors ``output`` holds, of ``||output - target||² / ||target||²`` per tensor (see
    :func:`relative_error`); ``references`` are the targets' ``||target||²`` when the caller has them already
    (a target seen at every step)."""
    pairs = list(zip(tensors(output), tensors(target), strict=True))
    if references is None:
        references = squared_norms(target)
    # mse_loss is one kernel forward and one backward: half the time of a difference squared and summed.
    ratios = [
        F.mse_loss(new, old, reduction="sum") / reference.clamp_min(1e-12)
        for (new, old), reference in zip(pairs, references, strict=True)
    ]
    return sum(ratios) / len(ratios)


def squared_norms(value: Any) -> list[Tensor]:
    return [t.detach().float().square().sum() for t in tensors(value)]


def tensors(value: Any) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, Tensor)]


def channels_last(args: tuple) -> tuple:
    return tuple(
        arg.contiguous(memory_format=torch.channels_last)
        if isinstance(arg, Tensor) and arg.dim() == 4
        else arg
        for arg in args
    )


def copied_values(value: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, value)


def detached(value: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, value)
