"""Warm start: teach each new block what the block it replaced computes, from unlabeled inputs only.

A rewrite gives freshly initialised blocks, so the rewritten model starts far from the original even when the
original was trained. :func:`warm_start` closes most of that gap before any labelled training: it runs the
original on the caller's inputs, records what goes into and comes out of every replaced module, and trains each
new block, site by site, to map those inputs to those outputs (a regression on the original's own features, no
labels). Blocks that can copy the replaced module's weights (a ``warm_start_from`` method, as the GS blocks
have) start from them; with ``end_to_end_steps``, all new blocks then train together on the whole model's
outputs. Then it reports, per site and for the whole model, the relative error before and after.

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
import functools
import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

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
    copied: bool = False  # whether the block started from the replaced module's weights (warm_start_from)


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
    end_to_end_steps: int = 0  # optimizer steps of all new blocks together on the whole model's outputs
    # Unchanged modules trained with the new blocks end to end (end_to_end_downstream).
    tuned: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [
            (
                site.path,
                f"{site.replaced} → {site.block}{' (copied)' if site.copied else ''}",
                site.before,
                site.after,
            )
            for site in self.sites
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
        together = f", then {self.end_to_end_steps} together" if self.end_to_end_steps else ""
        if self.tuned:
            together += f" with {', '.join(self.tuned)}"
        return (
            f"{table}\n\n{len(self.sites)} site(s), {self.steps} step(s) each{together} on {self.batches} "
            f"batch(es): {self.seconds:.1f} s"
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
    end_to_end_steps: int = 0,
    end_to_end_lr: float = 3e-4,
    end_to_end_seconds: float | None = None,
    end_to_end_downstream: bool = False,
    bfloat16: bool = False,
    progress: Callable[[str], None] | None = None,
) -> WarmStartReport:
    """Train every new block of ``rewritten`` to compute what ``original``'s module at its path computes.

    ``batches`` are what the models' forward takes: input tensors (or tuples of positional arguments), unlabeled.
    The original runs once over all of them in eval mode — its trained statistics, nothing updated — with a
    forward hook at every site recording the module's inputs and outputs.

    A new block that has a ``warm_start_from(replaced)`` method (the GS blocks of :mod:`rewrite.blocks` do)
    first gets the chance to copy the replaced module's weights where it can compute the same numbers; its
    BatchNorm layers that the copy left untouched get the statistics of their inputs, and a copy that leaves the
    block no closer to the replaced module's outputs is undone. Such a block is then fitted in eval mode with a
    tenth of ``lr``, so that what it copied is kept unless moving it helps.

    Each new block then trains on its own (Adam with ``lr`` held for 70 % of the steps, then decayed linearly
    to zero; a relative squared error), in two halves of ``steps``: first on the original's inputs at its site,
    then on those and the inputs the rewritten model itself gives it there (recorded in one pass once every
    block has had its first half), so that it also learns to undo what the new blocks before it still get
    wrong. The targets are always the original's outputs. A block with nothing copied trains in train mode
    (BatchNorm on batch statistics keeps a fit from random weights well conditioned); its running statistics
    are then set to the plain average over its inputs, so that eval mode computes what it learnt. A half that
    leaves a block no closer to its targets (in eval mode) is undone.

    With ``end_to_end_steps``, all new blocks then train together, in eval mode, for that many steps (Adam with
    ``end_to_end_lr``, decayed the same way, everything else frozen) on the relative squared difference between
    the whole models' outputs on the batches; undone if that difference did not shrink. With
    ``end_to_end_seconds``, that phase's steps stop once they have taken that long (``end_to_end_steps`` then
    caps them, or, at 0, does not), and the decay follows whichever budget is closer to spent: the most a
    machine can do in a given time; the report gives the steps taken. With
    ``end_to_end_downstream`` they train together with every module that runs only after the first new block
    has started (the head behind a rewritten neck), so that unchanged layers adapt to the new blocks; modules
    that also run earlier stay as they are, and so do parameters that do not require gradients. The report
    names those modules.

    With ``bfloat16``, the forward passes of every optimizer step, site by site and end to end, run under
    ``torch.autocast`` in bfloat16 (weights, gradients, the loss and every error reported stay float32):
    where the hardware multiplies bfloat16 natively (a CPU with AVX-512 BF16 or AMX, a recent GPU) a step is
    faster (slim-neck YOLOv5-S's neck and head on a 2-core AVX-512 BF16 CPU: 0.22 s instead of 0.29 s);
    elsewhere it is slower.

    Input tensors of four dimensions run in channels-last memory order: the values are the same, and on a CPU
    the depthwise convolutions' backward pass is an order of magnitude faster that way.

    The report's errors are measured in place, in eval mode: per site, what the new block gives inside the
    rewritten model against what the replaced module gives inside the original, on the same batches; for the
    whole model, the outputs.

    Only the new blocks' weights and statistics change (and, with ``end_to_end_downstream``, the parameters of
    the modules the report names); ``original`` is left as it was (modes, weights, caches, no hooks), and
    ``rewritten``'s modes are restored. Sites are found by :func:`changed_modules`; none at all is a
    :class:`~rewrite.errors.NoMatchError`, no batch or a time budget that is not positive an
    :class:`~rewrite.errors.InputSpecError`.
    """
    say = progress or (lambda message: None)
    start = time.perf_counter()
    inputs = [_channels_last(batch if isinstance(batch, tuple) else (batch,)) for batch in batches]
    if not inputs:
        raise InputSpecError("warm_start: `batches` gave nothing; pass an iterable of input tensors")
    if end_to_end_seconds is not None and not end_to_end_seconds > 0:
        raise InputSpecError(
            f"warm_start: end_to_end_seconds={end_to_end_seconds!r}; pass a positive number of seconds, or None "
            "for no time limit"
        )
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

    copied = {
        path
        for path in paths
        if _copy_from_replaced(rewritten.get_submodule(path), original.get_submodule(path), calls[path])
    }
    if copied:
        say(f"copied the replaced modules' weights into {len(copied)} block(s): {', '.join(sorted(copied))}")

    def fit(path: str, pairs: list[tuple[tuple, Any]], steps: int) -> None:
        if path in copied:
            _fit_half(
                rewritten.get_submodule(path),
                pairs,
                steps=steps,
                lr=lr / 10,
                train_mode=False,
                bfloat16=bfloat16,
            )
        else:
            _fit_half(
                rewritten.get_submodule(path), pairs, steps=steps, lr=lr, train_mode=True, bfloat16=bfloat16
            )

    if steps:
        _fit_sites(rewritten, paths, inputs, calls, fit, steps, say)
    tuned: list[str] = []
    if end_to_end_steps or end_to_end_seconds:
        budget = [f"{end_to_end_steps} steps"] if end_to_end_steps else []
        if end_to_end_seconds:
            budget.append(f"{end_to_end_seconds:g} s")
        say(f"all {len(paths)} block(s) together on the whole model's outputs, {' or '.join(budget)}")
        blocks = [rewritten.get_submodule(path) for path in paths]
        end_to_end_steps, tuned = _fit_end_to_end(
            rewritten,
            blocks,
            inputs,
            targets,
            steps=end_to_end_steps,
            lr=end_to_end_lr,
            seconds=end_to_end_seconds,
            downstream=end_to_end_downstream,
            bfloat16=bfloat16,
        )
    sites_after, model_after = _errors_in_place(rewritten, paths, inputs, calls, targets)

    fits = []
    for path in paths:
        old, new = type(original.get_submodule(path)).__name__, type(rewritten.get_submodule(path)).__name__
        fits.append(SiteFit(path, old, new, sites_before[path], sites_after[path], path in copied))
        say(f"{path}: {old} → {new}, rel. error {sites_before[path]:.4f} → {sites_after[path]:.4f}")
    say(f"whole model: rel. error {model_before:.4f} → {model_after:.4f}")
    return WarmStartReport(
        fits,
        model_before,
        model_after,
        steps,
        len(inputs),
        time.perf_counter() - start,
        end_to_end_steps,
        tuned,
    )


def _fit_sites(
    rewritten: nn.Module,
    paths: list[str],
    inputs: list[tuple],
    calls: dict[str, list[tuple[tuple, Any]]],
    fit: Callable[[str, list[tuple[tuple, Any]], int], None],
    steps: int,
    say: Callable[[str], None],
) -> None:
    """The site-by-site phase: each block's first half of ``steps`` on the original's inputs at its site, then
    the second half on those and the inputs the rewritten model gives it there."""
    first, second = steps // 2, steps - steps // 2
    for number, path in enumerate(paths, 1):
        say(f"{path} ({number}/{len(paths)}): fitting on the original's inputs, {first} steps")
        fit(path, calls[path], first)
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
            fit(path, pairs, second)


def _copy_from_replaced(block: nn.Module, replaced: nn.Module, calls: list[tuple[tuple, Any]]) -> bool:
    """Let ``block`` copy weights from ``replaced`` through its ``warm_start_from`` hook; whether it kept any.

    The BatchNorm layers the hook left at their fresh statistics get those of their inputs, so that eval-mode
    fitting starts well conditioned. A copy that does not bring the block closer to the recorded outputs (the
    replaced module computes something else than its structure suggested) is undone.
    """
    hook = getattr(block, "warm_start_from", None)
    if not callable(hook) or not calls:
        return False
    with _modes_kept(block):
        before = _block_error(block, calls)
        fresh = {name: value.clone() for name, value in block.state_dict().items()}
        fresh_means = {norm: norm.running_mean.clone() for norm in _norms(block)}
        if not hook(replaced):
            return False
        untouched = [norm for norm, mean in fresh_means.items() if torch.equal(mean, norm.running_mean)]
        _estimate_statistics(block, calls, untouched)
        if _block_error(block, calls) < before:
            return True
        block.load_state_dict(fresh)
        return False


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


def _fit_half(
    block: nn.Module,
    pairs: list[tuple[tuple, Any]],
    *,
    steps: int,
    lr: float,
    train_mode: bool,
    bfloat16: bool = False,
) -> None:
    """Fit ``block`` to ``pairs`` (inputs, target output), in train mode followed by a re-estimate of its
    statistics, or in eval mode (statistics kept), forward passes in bfloat16 autocast with ``bfloat16``;
    undone if no closer."""
    if not pairs or not steps:
        return
    with _modes_kept(block):
        before = _block_error(block, pairs)
        kept = {name: value.clone() for name, value in block.state_dict().items()}
        block.train(train_mode)

        def loss(args: tuple, target: Any) -> Tensor:
            with _autocast(block, bfloat16):
                output = block(*args)
            return _squared_relative(_as_float32(output), target)

        _fit(block, list(block.parameters()), loss, pairs, steps, lr)
        if train_mode:
            _estimate_statistics(block, pairs, _norms(block))
        # A diverged or futile fit: hand the block back as it came.
        if not _block_error(block, pairs) < before:
            block.load_state_dict(kept)


# Slim-neck YOLOv5-S, 720 end-to-end steps: 0.0243 of relative error this way (0.0242 with 20 % of cooldown,
# 0.0247 with 50 %), 0.0280 with a cosine decay over all steps, 0.0274 with a linear one. The error still falls
# fast at full rate; a decay that starts early gives that away.
_COOLDOWN = 0.3


def _fit(
    model: nn.Module,
    trained: list[nn.Parameter],
    loss: Callable[[tuple, Any], Tensor],
    pairs: list[tuple[tuple, Any]],
    steps: int,
    lr: float,
    seconds: float | None = None,
) -> int:
    """Train the ``trained`` parameters on ``loss(inputs, target)`` cycling over ``pairs``: Adam, ``lr`` held,
    then decayed linearly to zero over the last ``_COOLDOWN`` of the budget, for ``steps`` steps or ``seconds``
    seconds, whichever is spent first (either may be 0 / None: no such limit); the decay follows the budget
    closer to spent. Returns the steps taken.

    Modes are the caller's: in train mode BatchNorm normalises by each batch's statistics, which keeps a fit
    from random weights well conditioned while they move (with fixed statistics, the activations' scale
    drifts and the fit crawls); in eval mode the statistics stay, and the block computes what it learnt.
    Every other parameter of ``model`` is frozen meanwhile, so that no gradient is computed for it.
    """
    if not steps and not seconds:
        return 0
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    # The fused kernel updates every parameter in one call: on a CPU a step takes a third of the time.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trained)
    optimizer = torch.optim.Adam(trained, lr=lr, fused=fused)
    start, taken = time.perf_counter(), 0
    try:
        for p in parameters:
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        with torch.enable_grad():
            for args, target in itertools.cycle(pairs):
                spent = max(
                    taken / steps if steps else 0.0,
                    (time.perf_counter() - start) / seconds if seconds else 0.0,
                )
                if spent >= 1:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (1 - spent) / _COOLDOWN)
                value = loss(args, target)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                taken += 1
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)
            p.grad = None
    return taken


def _fit_end_to_end(
    model: nn.Module,
    blocks: list[nn.Module],
    inputs: list[tuple],
    targets: list[Any],
    *,
    steps: int,
    lr: float,
    seconds: float | None = None,
    downstream: bool = False,
    bfloat16: bool = False,
) -> tuple[int, list[str]]:
    """Train ``blocks`` together, in eval mode, on the whole ``model``'s relative output error (forward passes
    in bfloat16 autocast with ``bfloat16``), for ``steps`` steps or ``seconds`` seconds, whichever ends first;
    undone if no better. With ``downstream``, the parameters of the modules that run only after the first
    block has started train too. Returns the steps taken and the paths of those modules.

    What the model computes before the first new block runs does not change while they train: the outermost
    modules that run, once per forward, entirely before it are replayed from one recorded pass instead of
    computed again at every step (the backbone of a detector whose neck was rewritten), when replaying
    reproduces the model's outputs; otherwise every step runs the whole model.
    """
    with _modes_kept(model):
        model.eval()
        order = _call_order(model, blocks, inputs[0])
        prefix, recorded, outputs = _prefix_outputs(model, order, inputs)
        before = _relative_error(outputs, targets)
        trained = [p for block in blocks for p in block.parameters()]
        tuned = _downstream(model, order) if downstream else {}
        known = {id(p) for p in trained}
        # What the user froze (a DFL's fixed projection, say) stays frozen.
        trained += [
            p
            for module in tuned.values()
            for p in module.parameters()
            if p.requires_grad and id(p) not in known
        ]
        kept = [p.detach().clone() for p in trained]  # eval mode: parameters are all that can change
        with _replayed(prefix, recorded) as replay:

            def replayed(index: int, args: tuple) -> Any:
                replay.batch = index
                return model(*args)

            def error() -> float:
                with torch.no_grad():
                    return _relative_error(
                        [replayed(index, args) for index, args in enumerate(inputs)], targets
                    )

            if not math.isclose(error(), before, rel_tol=1e-4):
                replay.clear()  # the forward does not run the same way every time: compute everything

            references = [_squared_norm(target) for target in targets]

            def loss(args: tuple, target_and_index: tuple[Any, int]) -> Tensor:
                target, index = target_and_index
                with _autocast(model, bfloat16):
                    output = replayed(index, args)
                return _squared_relative(_as_float32(output), target, references[index])

            pairs = [(args, (target, index)) for index, (args, target) in enumerate(zip(inputs, targets))]
            taken = _fit(model, trained, loss, pairs, steps, lr, seconds)
            after = error()
        if not after < before:
            with torch.no_grad():
                for parameter, value in zip(trained, kept):
                    parameter.copy_(value)
    return taken, sorted(tuned)


@dataclass(frozen=True)
class _CallOrder:
    """When each submodule of a model ran in one forward pass: per module, the ``[start, end]`` events of
    each of its calls, in one count shared by all; the ids of the new blocks' modules; and the event that
    started the first call into one of them."""

    spans: dict[nn.Module, list[list[float]]]
    in_blocks: frozenset[int]
    first_block_start: float

    def ran_before_blocks(self, module: nn.Module) -> bool:
        return any(start < self.first_block_start for start, _ in self.spans.get(module, []))


def _call_order(model: nn.Module, blocks: list[nn.Module], args: tuple) -> _CallOrder:
    in_blocks = frozenset(id(m) for block in blocks for m in block.modules())
    events = itertools.count()
    spans: dict[nn.Module, list[list[float]]] = {}
    first_block_start = math.inf

    def pre_hook(module: nn.Module, args: tuple) -> None:
        nonlocal first_block_start
        event = next(events)
        spans.setdefault(module, []).append([event, math.inf])
        if id(module) in in_blocks:
            first_block_start = min(first_block_start, event)

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        spans[module][-1][1] = next(events)

    modules = [m for m in model.modules() if m is not model]
    handles = [
        h for m in modules for h in (m.register_forward_pre_hook(pre_hook), m.register_forward_hook(hook))
    ]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return _CallOrder(spans, in_blocks, first_block_start)


def _prefix_outputs(
    model: nn.Module, order: _CallOrder, inputs: list[tuple]
) -> tuple[list[nn.Module], list[list[Any]], list[Any]]:
    """The outermost modules of ``model`` called exactly once per forward, every call ending before the first
    new block starts; per batch their outputs; and per batch the model's outputs (eval mode, no gradient)."""
    spans = order.spans
    modules = [m for m in model.modules() if m is not model]
    early = {
        id(m) for m in modules if len(spans.get(m, [])) == 1 and spans[m][0][1] < order.first_block_start
    }
    prefix = [
        m
        for m in modules
        if id(m) in early and not any(id(parent) in early for parent in _ancestors_of(model, m))
    ]
    recorded: list[list[Any]] = []
    outputs: list[Any] = []

    def recorder(module: nn.Module, args: tuple, output: Any) -> None:
        recorded[-1].append(_detached(output))

    handles = [m.register_forward_hook(recorder) for m in prefix]
    try:
        with torch.no_grad():
            for args in inputs:
                recorded.append([])
                outputs.append(_detached(model(*args)))
    finally:
        for handle in handles:
            handle.remove()
    if any(len(batch) != len(prefix) for batch in recorded):
        return [], [], outputs
    # The hooks fire in call order, not in the order of ``prefix``: pair them up by that order.
    return sorted(prefix, key=lambda m: spans[m][0][1]), recorded, outputs


def _downstream(model: nn.Module, order: _CallOrder) -> dict[str, nn.Module]:
    """By path, the outermost modules outside the new blocks that hold parameters and ran, every time, after
    the first new block had started, sharing no parameter with a module that ran before it (training that one
    would change what the replayed prefix computes)."""
    early = {
        id(p) for m in model.modules() if order.ran_before_blocks(m) for p in m.parameters(recurse=False)
    }
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        later = module in order.spans and not order.ran_before_blocks(module)
        if not later or id(module) in order.in_blocks or any(path.startswith(f"{p}.") for p in found):
            continue
        parameters = list(module.parameters())
        if parameters and not any(id(p) in early for p in parameters):
            found[path] = module
    return found


def _ancestors_of(model: nn.Module, module: nn.Module) -> list[nn.Module]:
    path = next(name for name, m in model.named_modules() if m is module)
    parts = path.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


class _Replay:
    """While active, each prefix module's forward returns its recorded output for batch ``batch``."""

    def __init__(self, modules: list[nn.Module], recorded: list[list[Any]]) -> None:
        self.modules, self.recorded, self.batch = modules, recorded, 0

    def clear(self) -> None:
        for module in self.modules:
            del module.forward  # the instance attribute goes: the class's forward is back
        self.modules = []

    def install(self) -> None:
        for position, module in enumerate(self.modules):
            module.forward = functools.partial(self._output, position)

    def _output(self, position: int, *args: Any, **kwargs: Any) -> Any:
        return self.recorded[self.batch][position]


@contextlib.contextmanager
def _replayed(modules: list[nn.Module], recorded: list[list[Any]]) -> Iterator[_Replay]:
    replay = _Replay(modules, recorded)
    replay.install()
    try:
        yield replay
    finally:
        replay.clear()


def _norms(block: nn.Module) -> list[nn.Module]:
    """``block``'s BatchNorm layers that keep running statistics."""
    return [
        m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _estimate_statistics(block: nn.Module, pairs: list[tuple[tuple, Any]], norms: list[nn.Module]) -> None:
    """Set the running statistics of ``norms`` (BatchNorm layers of ``block``) to their plain average over the
    inputs, the rest of the block in eval mode; ``block`` is left in eval mode.

    After a train-mode fit the running averages lag behind the weights the fit moved (momentum 0.03 in the GS
    blocks); without this, eval mode would normalise with statistics of weights long gone.
    """
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    block.eval()
    for norm in norms:
        norm.train()
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


def _squared_relative(output: Any, target: Any, reference: Tensor | None = None) -> Tensor:
    """``||output - target||² / ||target||²`` over every tensor, as one vector; ``reference`` is
    ``||target||²`` when the caller has it already (a target seen at every step)."""
    pairs = list(zip(_tensors(output), _tensors(target), strict=True))
    # mse_loss is one kernel forward and one backward: half the time of a difference squared and summed.
    difference = sum(F.mse_loss(new, old, reduction="sum") for new, old in pairs)
    if reference is None:
        reference = _squared_norm(target)
    return difference / reference.clamp_min(1e-12)


def _squared_norm(value: Any) -> Tensor:
    return sum(t.detach().float().square().sum() for t in _tensors(value))


def _tensors(value: Any) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, Tensor)]


@contextlib.contextmanager
def _autocast(module: nn.Module, enabled: bool) -> Iterator[None]:
    """bfloat16 autocast on the device of ``module``'s parameters, or nothing when not ``enabled``.

    On a CPU, depthwise convolutions stay float32 inside it: there oneDNN's float32 depthwise kernels (with
    channels-last inputs) take half the time of its bfloat16 ones, backward pass included (slim-neck
    YOLOv5-S's 5×5 depthwise convs at batch 8: 0.9 ms instead of 2.0 ms for a forward and backward pass).
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
        if enabled and device.type == "cpu":
            with _Float32Depthwise():
                yield
        else:
            yield


class _Float32Depthwise(TorchFunctionMode):
    """Runs every depthwise ``conv2d`` (one input channel per group) with autocast off, in float32; its output
    goes back to the input's dtype, so that what follows runs as it would have."""

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.conv2d:
            signature = _CONV2D.bind(*args, **kwargs)
            weight, groups = signature.arguments["weight"], signature.arguments.get("groups", 1)
            if groups > 1 and weight.shape[1] == 1:
                dtype = signature.arguments["input"].dtype
                signature.arguments["input"] = signature.arguments["input"].float()
                with torch.autocast("cpu", enabled=False):
                    return func(*signature.args, **signature.kwargs).to(dtype)
        return func(*args, **kwargs)


_CONV2D = inspect.Signature(
    [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in [
            ("input", inspect.Parameter.empty),
            ("weight", inspect.Parameter.empty),
            ("bias", None),
            ("stride", 1),
            ("padding", 0),
            ("dilation", 1),
            ("groups", 1),
        ]
    ]
)


def _as_float32(value: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.float() if isinstance(t, Tensor) and t.dtype == torch.bfloat16 else t, value
    )


def _channels_last(args: tuple) -> tuple:
    return tuple(
        arg.contiguous(memory_format=torch.channels_last)
        if isinstance(arg, Tensor) and arg.dim() == 4
        else arg
        for arg in args
    )


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
