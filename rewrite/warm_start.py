"""Warm start: teach each new block what the block it replaced computes, from unlabeled inputs only.

A rewrite gives freshly initialised blocks, so the rewritten model starts far from the original even when the
original was trained. :func:`warm_start` closes most of that gap before any labelled training: it runs the
original on the caller's inputs, records what goes into and comes out of every replaced module, and trains each
new block, site by site, to map those inputs to those outputs (a regression on the original's own features, no
labels). Then it reports, per site and for the whole model, the relative error before and after.

A site is any module path where the rewritten model holds a module of another class than the original does
(a GSConv where a Conv was, a VoVGSCSP where a C3 was, whatever a rule put there). Nothing here knows a detector.

>>> import torch, rewrite
>>> from rewrite.zoo import create_model
>>> _ = torch.manual_seed(0)
>>> model = create_model("yolov5n", nc=2).eval()
>>> slim = rewrite.apply(model, "slim-neck", torch.zeros(1, 3, 64, 64))
>>> report = rewrite.warm_start(slim, model, [torch.rand(2, 3, 64, 64)], steps=2)
>>> [site.path for site in report.sites][:3]
['model.10', 'model.13', 'model.14']
>>> print(report)  # doctest: +ELLIPSIS
site         change         rel. error before    after    after / before
-----------  -------------  -------------------  -------  ----------------
model.10     Conv → GSConv  ...
whole model  outputs        ...
<BLANKLINE>
8 site(s), 2 step(s) each on 1 batch(es): ... s
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate
from torch import Tensor, fx, nn

from rewrite.errors import InputSpecError, NoMatchError
from rewrite.execution import attributes_restored

__all__ = ["SiteFit", "WarmStartReport", "changed_modules", "warm_start"]


@dataclass(frozen=True)
class SiteFit:
    """One new block: where it is, what it replaced, and its relative error on the inputs before and after."""

    path: str
    replaced: str  # class name of the original's module at ``path``
    block: str  # class name of the new module
    before: float  # ||new block's outputs - replaced module's|| / ||replaced module's||, each in its model
    after: float  # the same after the warm start


@dataclass(frozen=True)
class WarmStartReport:
    """What :func:`warm_start` did; ``str(report)`` is a table.

    ``model_before`` / ``model_after`` compare the two whole models' outputs on the same inputs (every tensor
    of the output, flattened together): ``||rewritten(x) - original(x)|| / ||original(x)||``.
    """

    sites: list[SiteFit]
    model_before: float
    model_after: float
    steps: int  # optimizer steps per site
    batches: int
    seconds: float

    def __str__(self) -> str:
        rows = [
            (site.path, f"{site.replaced} → {site.block}", site.before, site.after) for site in self.sites
        ]
        rows.append(("whole model", "outputs", self.model_before, self.model_after))
        rows = [
            (*row[:2], f"{row[2]:.4f}", f"{row[3]:.4f}", f"{row[3] / row[2]:.3f}" if row[2] else "")
            for row in rows
        ]
        table = tabulate(
            rows,
            headers=["site", "change", "rel. error before", "after", "after / before"],
            disable_numparse=True,
        )
        return (
            f"{table}\n\n{len(self.sites)} site(s), {self.steps} step(s) each on {self.batches} batch(es): "
            f"{self.seconds:.1f} s"
        )


def changed_modules(rewritten: nn.Module, original: nn.Module) -> list[str]:
    """The module paths where ``rewritten`` holds a module of another class than ``original`` does.

    Paths are the outermost changed ones (a new block's own submodules are not listed again). A module that an
    fx graph rewrite put in place of a region is looked into rather than listed: it holds the original's
    modules under their own names; new modules there replaced ops, not a module of the original, and are left
    out.

    >>> from torch import nn
    >>> before = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 1)))
    >>> after = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.SiLU(), nn.Conv2d(8, 8, 1)))
    >>> changed_modules(after, before)
    ['1.0']
    """
    found: list[str] = []
    for path, old in original.named_modules():
        if any(path.startswith(prefix + ".") for prefix in found):
            continue
        try:
            new = rewritten.get_submodule(path)
        except AttributeError:
            continue
        if type(new) is not type(old) and not isinstance(new, fx.GraphModule):
            found.append(path)
    return found


def warm_start(
    rewritten: nn.Module,
    original: nn.Module,
    batches: Iterable[Any],
    *,
    steps: int = 100,
    lr: float = 1e-2,
    progress: Callable[[str], None] | None = None,
) -> WarmStartReport:
    """Train every new block of ``rewritten`` to compute what ``original``'s module at its path computes.

    ``batches`` are what the models' forward takes: input tensors (or tuples of positional arguments), unlabeled.
    The original runs once over all of them in eval mode — its trained statistics, nothing updated — with a
    forward hook at every site recording the module's inputs and outputs. Each new block then trains on its own
    (Adam with ``lr`` and a cosine decay, a relative squared error), in two halves of ``steps``: first on the
    original's inputs at its site, then on those and the inputs the rewritten model itself gives it there
    (recorded in one pass once every block has had its first half), so that it also learns to undo what the new
    blocks before it still get wrong. The targets are always the original's outputs. It trains in train mode
    (BatchNorm on batch statistics keeps the fit well conditioned); its running statistics are then set to the
    plain average over its inputs, so that eval mode computes what it learnt. A half that leaves a block no
    closer to its targets (in eval mode) is undone. The default budget is a few seconds per site of a small
    detector on a CPU.

    The report's errors are measured in place, in eval mode: per site, what the new block gives inside the
    rewritten model against what the replaced module gives inside the original, on the same batches; for the
    whole model, the outputs.

    Only the new blocks' weights and statistics change; ``original`` is left as it was (modes, weights, caches,
    no hooks), and ``rewritten``'s modes are restored. Sites are found by :func:`changed_modules`; none at all
    is a :class:`~rewrite.errors.NoMatchError`, and no batch an :class:`~rewrite.errors.InputSpecError`.
    """
    say = progress or (lambda message: None)
    start = time.perf_counter()
    inputs = [batch if isinstance(batch, tuple) else (batch,) for batch in batches]
    if not inputs:
        raise InputSpecError("warm_start: `batches` gave nothing; pass an iterable of input tensors")
    paths = changed_modules(rewritten, original)
    if not paths:
        raise NoMatchError(
            f"warm_start: {type(rewritten).__name__} has no module of another class than "
            f"{type(original).__name__} at the same path; pass the result of rewrite.apply() on the original"
        )

    # attributes_restored: the original's modes, and whatever its forward caches, go back as they were.
    with attributes_restored(original), torch.no_grad():
        original.eval()
        say(f"recording the original's features at {len(paths)} site(s) on {len(inputs)} batch(es)")
        calls, targets = _record(original, paths, inputs)
    sites_before, model_before = _errors_in_place(rewritten, paths, inputs, calls, targets)

    first, second = steps // 2, steps - steps // 2
    for number, path in enumerate(paths, 1):
        say(f"{path} ({number}/{len(paths)}): fitting on the original's inputs, {first} steps")
        _fit_half(rewritten.get_submodule(path), calls[path], steps=first, lr=lr)
    with _modes_kept(rewritten), torch.no_grad():
        rewritten.eval()
        own, _ = _record(rewritten, paths, inputs)
    for number, path in enumerate(paths, 1):
        if len(own[path]) == len(calls[path]):  # else its calls do not pair up: it keeps its first half
            say(f"{path} ({number}/{len(paths)}): fitting on its own inputs as well, {second} steps")
            # Both inputs, each with the original's output: fitted to its own inputs alone, a block learns to
            # lean on what the blocks before it got wrong in the first half, and those move again in this one.
            own_pairs = [(args, target) for (args, _), (_, target) in zip(own[path], calls[path])]
            pairs = [pair for both in zip(own_pairs, calls[path]) for pair in both]
            _fit_half(rewritten.get_submodule(path), pairs, steps=second, lr=lr)
    sites_after, model_after = _errors_in_place(rewritten, paths, inputs, calls, targets)

    fits = []
    for path in paths:
        old, new = type(original.get_submodule(path)).__name__, type(rewritten.get_submodule(path)).__name__
        fits.append(SiteFit(path, old, new, sites_before[path], sites_after[path]))
        say(f"{path}: {old} → {new}, rel. error {sites_before[path]:.4f} → {sites_after[path]:.4f}")
    say(f"whole model: rel. error {model_before:.4f} → {model_after:.4f}")
    return WarmStartReport(fits, model_before, model_after, steps, len(inputs), time.perf_counter() - start)


def _record(
    model: nn.Module, paths: list[str], inputs: list[tuple]
) -> tuple[dict[str, list[tuple[tuple, Any]]], list[Any]]:
    """Run ``model`` on every batch: each site's calls (positional inputs, output), and the model's outputs."""
    calls: dict[str, list[tuple[tuple, Any]]] = {path: [] for path in paths}

    def recorder(path: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            calls[path].append((_detached(args), _detached(output)))

        return hook

    handles = [model.get_submodule(path).register_forward_hook(recorder(path)) for path in paths]
    try:
        outputs = [_detached(model(*x)) for x in inputs]
    finally:
        for handle in handles:
            handle.remove()
    return calls, outputs


def _errors_in_place(
    rewritten: nn.Module,
    paths: list[str],
    inputs: list[tuple],
    calls: dict[str, list[tuple[tuple, Any]]],
    targets: list[Any],
) -> tuple[dict[str, float], float]:
    """Eval-mode relative errors of each new block inside ``rewritten`` against the original's calls, and of
    the whole model's outputs against the original's."""
    seen: dict[str, list] = {path: [] for path in paths}

    def comparer(path: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            seen[path].append(_detached(output))

        return hook

    with _modes_kept(rewritten), torch.no_grad():
        rewritten.eval()
        handles = [rewritten.get_submodule(path).register_forward_hook(comparer(path)) for path in paths]
        try:
            outputs = [_detached(rewritten(*x)) for x in inputs]
        finally:
            for handle in handles:
                handle.remove()
    sites = {
        path: _relative_error(seen[path][: len(calls[path])], [t for _, t in calls[path]][: len(seen[path])])
        for path in paths
    }
    return sites, _relative_error(outputs, targets)


def _fit_half(block: nn.Module, pairs: list[tuple[tuple, Any]], *, steps: int, lr: float) -> None:
    """Fit ``block`` to ``pairs`` (inputs, target output), then re-estimate its statistics; undone if no closer."""
    if not pairs or not steps:
        return
    with _modes_kept(block):
        before = _block_error(block, pairs)
        kept = {name: value.clone() for name, value in block.state_dict().items()}
        _fit(block, pairs, steps=steps, lr=lr)
        _estimate_statistics(block, pairs)
        # A diverged or futile fit: hand the block back as it came.
        if not _block_error(block, pairs) < before:
            block.load_state_dict(kept)


def _fit(block: nn.Module, pairs: list[tuple[tuple, Any]], *, steps: int, lr: float) -> None:
    """Train ``block`` to map each pair's inputs to its output: relative squared error, Adam, cosine decay.

    Train mode: BatchNorm normalises by each batch's statistics, which keeps the fit well conditioned while
    the weights move (with fixed statistics, the activations' scale drifts and the fit crawls).
    """
    parameters = list(block.parameters())
    flags = [p.requires_grad for p in parameters]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps))
    )
    block.train()
    try:
        for p in parameters:
            p.requires_grad_(True)
        with torch.enable_grad():
            for args, target in itertools.islice(itertools.cycle(pairs), steps):
                loss = _squared_relative(block(*args), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)


def _estimate_statistics(block: nn.Module, pairs: list[tuple[tuple, Any]]) -> None:
    """Set every BatchNorm's running statistics to their plain average over the inputs (train-mode passes).

    The running averages lag behind the weights the fit moved (momentum 0.03 in the GS blocks); without this,
    eval mode would normalise with statistics of weights long gone.
    """
    norms = [
        m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    block.train()
    try:
        with torch.no_grad():
            for args, _ in pairs:
                block(*args)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        block.eval()


def _block_error(block: nn.Module, calls: list[tuple[tuple, Any]]) -> float:
    block.eval()
    with torch.no_grad():
        return _relative_error((block(*args) for args, _ in calls), [target for _, target in calls])


def _relative_error(outputs: Iterable[Any], targets: list[Any]) -> float:
    """``||outputs - targets|| / ||targets||`` over every tensor of every output, as one vector."""
    difference = reference = 0.0
    for output, target in zip(outputs, targets, strict=True):
        for new, old in zip(_tensors(output), _tensors(target), strict=True):
            difference += float((new.float() - old.float()).square().sum())
            reference += float(old.float().square().sum())
    return math.sqrt(difference / reference) if reference else math.sqrt(difference)


def _squared_relative(output: Any, target: Any) -> Tensor:
    pairs = list(zip(_tensors(output), _tensors(target), strict=True))
    difference = sum((new - old).square().sum() for new, old in pairs)
    reference = sum(old.square().sum() for _, old in pairs)
    return difference / reference.clamp_min(1e-12)


def _tensors(value: Any) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, Tensor)]


def _detached(value: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, value)


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module's train/eval mode back as it was on the way out."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
