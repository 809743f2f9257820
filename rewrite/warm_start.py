"""Warm start: teach each new block what the modules it replaced compute, from unlabeled inputs only.

A rewrite gives freshly initialised blocks, so the rewritten model starts far from the original even when the
original was trained. :func:`warm_start` closes most of that gap before any labelled training, within one time
budget: it runs the original on the caller's inputs and records what goes into and comes out of every site;
blocks that can copy the replaced modules' weights (a ``warm_start_from`` method, as the GS blocks have) start
from them; each new block trains, site by site, to map those inputs to those outputs; then all new blocks
train together, with the unchanged modules that run after them, on the whole model's outputs (a regression on
the original's own outputs, no labels). It reports, per site and for the whole model, the relative error
before and after.

The sites are a plan's (:class:`rewrite.Plan`), module paths the caller names, or the new blocks found by
:func:`changed_modules`. Nothing here knows a detector.

>>> import copy, torch, rewrite
>>> from torch import nn
>>> from rewrite.blocks import ConvBNAct, GSConv
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(ConvBNAct(3, 16, 3), ConvBNAct(16, 32, 3), nn.Conv2d(32, 4, 1)).eval()
>>> slim = copy.deepcopy(model)
>>> slim[1] = GSConv(16, 32, 3)  # what a rule would put there; rewrite.plan(...).apply() is the usual way
>>> report = rewrite.warm_start(slim, model, [torch.rand(8, 3, 32, 32)], sites=["1"], seconds=2)
>>> report.sites[0].replaced, report.sites[0].block, report.model_after <= report.model_before
('ConvBNAct', 'GSConv', True)
>>> print(report)  # doctest: +ELLIPSIS
site         change...rel. error before    after    after / before
-----------  -------...-------------------  -------  ----------------
1            ConvBNAct → GSConv...
whole model  outputs...
<BLANKLINE>
1 site(s) on 1 batch(es) in ... s (budget 2 s): ... step(s) site by site, then ... together...
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from rewrite.errors import InputSpecError, NoMatchError
from rewrite.execution import attributes_restored
from rewrite.planner import Plan
from rewrite.vocabulary import is_idempotent

__all__ = ["SiteFit", "WarmStartReport", "changed_modules", "warm_start"]

# The budget's split: the share of the time left after recording that the site-by-site fits get; the end-to-end
# steps get the rest. On a YOLOv8n trained for 5 epochs, rewritten with slim-neck-v8 (bench/warm_start.py, 30 s,
# one thread of a loaded 2-core CPU), mAP50-95 after: share 0 (end to end only) 0.004, 0.5 0.250, 0.75 0.264
# of the base's 0.318: at this budget the block-sized steps of the fits do far more than whole-model steps.
_SITE_SHARE = 0.75
_SITE_LR = 1e-2  # a block fitted from fresh weights; one that copied its replaced module's gets a tenth
_END_TO_END_LR = 3e-4
# The batches (or a site's calls) that the checks run on (the whole model's error after a phase, a block's before
# and after a fit, its statistics): the first few tell as well as all of them, for a fraction of the time.
_CHECKED = 8


@dataclass(frozen=True)
class SiteFit:
    """One new block: where it is, what it replaced, and its relative error on the inputs before and after.

    ``before`` / ``after`` are ``None`` for a block that stands for no module of the original (an fx graph
    rewrite's, standing for ops): it trains with the others on the whole model's outputs only.
    """

    path: str
    replaced: str  # class name(s) of the original's module(s) the block stands for
    block: str  # class name of the new module
    # ||new block's outputs - replaced modules'|| / ||replaced modules'||, each in its model; then after
    before: float | None
    after: float | None
    copied: bool = False  # whether the block started from the replaced module's weights (warm_start_from)
    steps: int = 0  # optimizer steps of the block on its own


@dataclass(frozen=True)
class WarmStartReport:
    """What :func:`warm_start` did; ``str(report)`` is a table.

    ``model_before`` / ``model_after`` compare the two whole models' outputs on the same inputs: the root mean,
    over the tensors an output holds, of ``||rewritten(x) - original(x)||² / ||original(x)||²`` per tensor (a
    detector's boxes in pixels would outweigh its maps and scores as one vector). The errors, per site and
    whole, are measured in eval mode on the first 8 batches (all of them when there are fewer).
    """

    sites: list[SiteFit]
    model_before: float
    model_after: float
    batches: int
    seconds: float  # the wall time taken
    budget: float  # the ``seconds`` asked for
    end_to_end_steps: int = 0  # optimizer steps of all new blocks together on the whole model's outputs
    # Unchanged modules trained with the new blocks end to end: those that run only after them.
    tuned: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # site path: why nothing was trained there

    def __str__(self) -> str:
        def cell(value: float | None) -> str:
            return "—" if value is None else f"{value:.4f}"

        rows = [
            (
                site.path,
                f"{site.replaced} → {site.block}{' (copied)' if site.copied else ''}",
                cell(site.before),
                cell(site.after),
                f"{site.after / site.before:.3f}" if site.before and site.after is not None else "",
            )
            for site in self.sites
        ]
        rows.append(
            (
                "whole model",
                "outputs",
                cell(self.model_before),
                cell(self.model_after),
                f"{self.model_after / self.model_before:.3f}" if self.model_before else "",
            )
        )
        table = tabulate(
            rows,
            headers=["site", "change", "rel. error before", "after", "after / before"],
            disable_numparse=True,
        )
        steps = sum(site.steps for site in self.sites)
        done = [f"{steps} step(s) site by site", f"{self.end_to_end_steps} together"]
        if self.tuned:
            done[-1] += f" with {', '.join(self.tuned)}"
        summary = (
            f"{len(self.sites)} site(s) on {self.batches} batch(es) in {self.seconds:.1f} s "
            f"(budget {self.budget:g} s): {', then '.join(done)}"
        )
        lines = [table, "", summary, *(f"skipped {path}: {why}" for path, why in self.skipped.items())]
        return "\n".join(lines)


def changed_modules(rewritten: nn.Module, original: nn.Module) -> list[str]:
    """The paths of ``rewritten``'s new blocks: outermost modules of another class than ``original``'s at the
    same path, or at a path ``original`` lacks (a graph rewrite's block, inside the fx graph module that took a
    region's place; such a graph module is looked into, not listed).

    A module with no parameters or buffers is no block of its own: the ``nn.Identity`` standing where a
    BatchNorm was, once a conv -> norm -> activation chain became one block, belongs to that block.

    >>> from torch import nn
    >>> before = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
    >>> after = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU()), nn.Identity(),
    ...                       nn.Identity())
    >>> changed_modules(after, before)
    ['0']
    """
    originals = dict(original.named_modules())
    found: list[str] = []
    for path, new in rewritten.named_modules():
        if not path or any(path.startswith(prefix + ".") for prefix in found):
            continue
        old = originals.get(path)
        if isinstance(new, fx.GraphModule) and not isinstance(old, fx.GraphModule):
            continue  # a region's graph: it holds the original's modules under their own names
        if old is not None and type(new) is type(old):
            continue
        if next(itertools.chain(new.parameters(), new.buffers()), None) is not None:
            found.append(path)
    return found


def warm_start(
    rewritten: nn.Module,
    original: nn.Module,
    batches: Iterable[Any],
    *,
    sites: Plan | Sequence[str] | None = None,
    seconds: float = 30.0,
    progress: Callable[[str], None] | None = None,
) -> WarmStartReport:
    """Train every new block of ``rewritten`` to compute what the modules it replaced in ``original`` compute,
    within ``seconds`` of wall time; returns what it did.

    ``batches`` are what the models' forward takes: input tensors (or tuples of positional arguments),
    unlabeled; a few hundred images of the training set, as the model is fed them, are plenty. ``sites`` says
    where the new blocks are: the :class:`~rewrite.Plan` that made ``rewritten`` (its ``module`` and
    ``modules`` sites name the modules each block stands for; its graph sites' blocks are found as in
    :func:`changed_modules`), a list of the new blocks' module paths, or ``None`` for :func:`changed_modules`.
    A block that replaced a chain of modules of a larger forward (``act(bn(conv(x)))``, the others now
    ``nn.Identity``) is fitted to what the whole chain computes.

    Within the budget, in this order; each phase after the first is undone unless it brings the whole model's
    outputs closer to the original's (per output tensor, relative: see :class:`WarmStartReport`):

    1. The original runs once over all batches in eval mode — its trained statistics, nothing updated —
       recording each site's inputs and outputs; so does ``rewritten``, for the errors before.
    2. A block with a ``warm_start_from(replaced)`` method (the GS blocks of :mod:`rewrite.blocks`) copies the
       replaced modules' weights where it can compute the same numbers; a copy that leaves the block no closer
       to their outputs is undone.
    3. Three quarters of the time left: each block on its own, a regression on the original's outputs at its
       site, first from the original's inputs there, then from those and the inputs the rewritten model gives
       it (so that it learns to undo what the blocks before it still get wrong); each half of each block an
       equal share of the time still left. A block that copied weights is fitted in eval mode at a tenth of
       the learning rate, so that what it copied stays unless moving it helps; a fresh block in train mode,
       its statistics re-estimated afterwards. Block-sized steps are cheap: at short budgets this phase does
       the most (see ``bench/warm_start.py``).
    4. The rest, when some is left: all new blocks together, with every unchanged module that runs only after
       the first new block has started (a detector's head behind its rewritten neck), on the whole model's
       outputs, in eval mode, as many steps as the time allows, the learning rate decaying over its last 30 %.

    On hardware that multiplies bfloat16 natively (a CPU with AVX-512 BF16 or AMX, a recent GPU) the training
    steps' forward passes run in bfloat16 autocast; weights, the loss and every error reported stay float32.
    The passes that record and measure are part of the budget (about six forward passes over the batches):
    a budget they use up leaves the blocks nearly as they were; the report gives the time taken.

    Only the new blocks' weights and statistics and the parameters of the modules the report names as tuned
    change; ``original`` is left as it was (modes, weights, caches, no hooks), and ``rewritten``'s modes are
    restored. A site whose block has nothing to train is skipped and named in the report. No site at all is a
    :class:`~rewrite.errors.NoMatchError`; no batch, a budget that is not a positive number of seconds, or a
    site path ``rewritten`` does not hold, an :class:`~rewrite.errors.InputSpecError`.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise InputSpecError(f"warm_start: seconds={seconds!r}; pass the time budget as a positive number")
    say = progress or (lambda message: None)
    start = time.perf_counter()
    deadline = start + seconds
    inputs = [_channels_last(batch if isinstance(batch, tuple) else (batch,)) for batch in batches]
    if not inputs:
        raise InputSpecError("warm_start: `batches` gave nothing; pass an iterable of input tensors")
    resolved, skipped = _resolve_sites(rewritten, original, sites, inputs[0])
    if not resolved:
        why = f" ({'; '.join(f'{path}: {reason}' for path, reason in skipped.items())})" if skipped else ""
        raise NoMatchError(
            f"warm_start: {type(rewritten).__name__} has no new block to train against "
            f"{type(original).__name__}{why}; pass the result of rewrite.apply() on the original"
        )
    compared = [site for site in resolved if site.replaced is not None]

    # attributes_restored: the original's modes, and whatever its forward caches, go back as they were.
    with attributes_restored(original), torch.no_grad():
        original.eval()
        say(f"recording the original's features at {len(compared)} site(s) on {len(inputs)} batch(es)")
        calls, targets = _record(original, compared, inputs, in_original=True)
    # The errors, and the checks that judge each phase, run on the first few batches: a fraction of a pass.
    checked = (inputs[:_CHECKED], targets[:_CHECKED])
    measured = time.perf_counter()
    sites_before, model_before = _errors_in_place(rewritten, compared, checked[0], calls, checked[1])
    # What a forward pass of the rewritten model over one batch costs: what the passes still to come will.
    per_batch = (time.perf_counter() - measured) / len(checked[0])

    blocks = [rewritten.get_submodule(site.path) for site in resolved]
    error = model_before

    def judged(phase: Callable[[], bool], name: str) -> bool:
        """Run ``phase`` (which says whether it changed anything); undo what it did to the blocks unless it
        brought the whole model closer. Each block closer to its own targets, they may still take the model
        further away together (their errors add up)."""
        nonlocal error
        kept = [copy.deepcopy(block.state_dict()) for block in blocks]
        if not phase():
            return False
        now = _model_error(rewritten, *checked)
        if now < error:
            error = now
            return True
        say(f"{name} left the whole model no closer ({error:.4f} → {now:.4f}): undone")
        for block, state in zip(blocks, kept):
            block.load_state_dict(state)
        return False

    copied: set[str] = set()

    def copy_all() -> bool:
        for site in compared:
            if _copy_from_replaced(
                rewritten.get_submodule(site.path), site.replaced, calls[site.path][:_CHECKED]
            ):
                copied.add(site.path)
        return bool(copied)

    if compared and judged(copy_all, "the copies"):
        say(f"copied the replaced modules' weights into {len(copied)} block(s): {', '.join(sorted(copied))}")
    else:
        copied.clear()

    bfloat16 = _native_bfloat16(rewritten)
    steps: dict[str, int] = {}
    # Its share of what is left once the passes still to come are paid for (its check, the errors after).
    share = _SITE_SHARE * (deadline - time.perf_counter() - 2 * len(checked[0]) * per_batch)
    if compared and share > 0:

        def fit(path: str, pairs: list[tuple[tuple, Any]], seconds: float) -> int:
            fresh = path not in copied
            return _fit_half(
                rewritten.get_submodule(path),
                pairs,
                seconds=seconds,
                lr=_SITE_LR if fresh else _SITE_LR / 10,
                train_mode=fresh,
                bfloat16=bfloat16,
            )

        def fit_sites() -> bool:
            steps.update(_fit_sites(rewritten, compared, inputs, calls, fit, share, say))
            return True

        if not judged(fit_sites, "the fits"):
            steps.clear()
    # The end-to-end phase records the model's prefix and measures twice (both replayed: cheaper than a whole
    # pass); then the errors after.
    left = deadline - time.perf_counter() - (2 * len(inputs) + len(checked[0])) * per_batch
    end_to_end_steps, tuned = 0, []
    if left > 0:
        say(f"all {len(resolved)} block(s) together on the whole model's outputs, {left:.1f} s")
        end_to_end_steps, tuned = _fit_end_to_end(
            rewritten, blocks, inputs, targets, lr=_END_TO_END_LR, seconds=left, bfloat16=bfloat16
        )
    sites_after, model_after = _errors_in_place(rewritten, compared, checked[0], calls, checked[1])

    fits = []
    for site in resolved:
        new = type(rewritten.get_submodule(site.path)).__name__
        before, after = sites_before.get(site.path), sites_after.get(site.path)
        fits.append(
            SiteFit(site.path, site.name, new, before, after, site.path in copied, steps.get(site.path, 0))
        )
        if before is not None:
            say(f"{site.path}: {site.name} → {new}, rel. error {before:.4f} → {after:.4f}")
    say(f"whole model: rel. error {model_before:.4f} → {model_after:.4f}")
    return WarmStartReport(
        fits,
        model_before,
        model_after,
        len(inputs),
        time.perf_counter() - start,
        seconds,
        end_to_end_steps,
        tuned,
        skipped,
    )


@dataclass(frozen=True)
class _Site:
    """A new block at ``path`` of the rewritten model and what it stands for in the original: the module at
    ``path`` there, or the chain of modules starting there (as one ``nn.Sequential``); ``None`` when the
    original has no module to compare it with (a graph rewrite's block)."""

    path: str
    replaced: nn.Module | None
    name: str  # the replaced module's class name, or the chain's joined by "+"
    chained: bool = False  # ``replaced`` is a chain: the original's first module's output feeds the rest

    def target(self, output: Any) -> Any:
        """The site's output in the original, from the output of its first module there."""
        return self.replaced[1:](output) if self.chained else output


def _resolve_sites(
    rewritten: nn.Module, original: nn.Module, sites: Plan | Sequence[str] | None, example: tuple
) -> tuple[list[_Site], dict[str, str]]:
    """The sites to warm-start, and the paths skipped with the reason."""
    found = changed_modules(rewritten, original)
    if isinstance(sites, Plan):
        chains = {change.path: change.modules for change in sites.sites if change.kind != "graph"}
        missing = [path for path in chains if path not in found]
        if missing:
            raise InputSpecError(
                f"warm_start: the plan's site {missing[0]!r} holds no new block in {type(rewritten).__name__}; "
                "pass the model this plan's apply() returned"
            )
        originals = dict(original.named_modules())
        paths = [*chains, *(path for path in found if path not in originals)]  # graph sites' blocks
    elif sites is None:
        paths, chains = found, {}
    else:
        paths = list(sites)
        unknown = next((path for path in paths if not _holds(rewritten, path)), None)
        if unknown is not None:
            raise InputSpecError(
                f"warm_start: sites names {unknown!r}, which {type(rewritten).__name__} does not hold; pass "
                "the paths of its new blocks (rewrite.warm_start.changed_modules lists them)"
            )
        chains = {}
    unchained = [path for path in paths if path not in chains and _holds(original, path)]
    chains.update(_chains(rewritten, original, unchained, example) if unchained else {})

    resolved, skipped = [], {}
    for path in paths:
        if not any(p.requires_grad for p in rewritten.get_submodule(path).parameters()):
            skipped[path] = "its new block has no trainable parameters"
            continue
        chain = [original.get_submodule(p) for p in chains.get(path, ())]
        if not chain:
            resolved.append(_Site(path, None, "ops"))
        elif len(chain) == 1:
            resolved.append(_Site(path, chain[0], type(chain[0]).__name__))
        else:
            name = "+".join(type(module).__name__ for module in chain)
            resolved.append(_Site(path, nn.Sequential(*chain), name, chained=True))
    return resolved, skipped


def _holds(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _chains(
    rewritten: nn.Module, original: nn.Module, paths: list[str], example: tuple
) -> dict[str, tuple[str, ...]]:
    """Per new block at one of ``paths``, the original's modules it stands for, found from one forward pass of
    ``rewritten``: the block, then the ``nn.Identity`` modules it feeds in a row where the original has other
    modules (a chain of a larger forward became the block), then an idempotent activation the forward calls
    more than once, kept in place after the chain (a ResNet block's one ``relu``)."""
    blocks = {id(rewritten.get_submodule(path)) for path in paths}
    inside = {id(m) for path in paths for m in rewritten.get_submodule(path).modules()} - blocks
    # In the order the calls return: path, module, first argument and its version, output and its version (a
    # value changed in place between two calls, `out += identity`, is another value).
    completed: list[tuple[str, nn.Module, Any, Any]] = []
    arguments: list[Any] = []  # per call under way, innermost last: its first argument as it came
    counts: dict[int, int] = {}

    def called(path: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            arguments.append(_versioned(args[0] if args else None))

        return hook

    def returned(path: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            counts[id(module)] = counts.get(id(module), 0) + 1
            completed.append((path, module, arguments.pop(), _versioned(output)))

        return hook

    watched = {path: m for path, m in rewritten.named_modules(remove_duplicate=False) if id(m) not in inside}
    with (
        _modes_kept(rewritten),
        torch.no_grad(),
        _hooks(watched, called, pre=True),
        _hooks(watched, returned),
    ):
        rewritten.eval()
        rewritten(*example)
    chains = {}
    for path in paths:
        index = next((i for i, call in enumerate(completed) if call[0] == path), None)
        chain = [path]
        while index is not None and index + 1 < len(completed):
            index += 1
            next_path, module, argument, _ = completed[index]
            if argument != completed[index - 1][3] or not _holds(original, next_path):
                break
            replaced = original.get_submodule(next_path)
            if isinstance(module, nn.Identity) and not isinstance(replaced, nn.Identity):
                chain.append(next_path)
                continue
            if type(module) is type(replaced) and is_idempotent(module) and counts[id(module)] > 1:
                chain.append(next_path)
            break
        chains[path] = tuple(chain)
    return chains


def _versioned(value: Any) -> tuple[int, int] | None:
    """A tensor's identity and in-place version: equal for the same value, unequal once changed in place."""
    return (id(value), value._version) if isinstance(value, Tensor) else None


@contextlib.contextmanager
def _hooks(
    modules: dict[str, nn.Module], hook_for: Callable[[str], Callable], *, pre: bool = False
) -> Iterator[None]:
    """A forward hook ``hook_for(path)`` on each module of ``modules`` (by path), a forward pre-hook with
    ``pre``; removed on the way out."""
    handles = [
        module.register_forward_pre_hook(hook_for(path))
        if pre
        else module.register_forward_hook(hook_for(path))
        for path, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _fit_sites(
    rewritten: nn.Module,
    sites: list[_Site],
    inputs: list[tuple],
    calls: dict[str, list[tuple[tuple, Any]]],
    fit: Callable[[str, list[tuple[tuple, Any]], float], int],
    seconds: float,
    say: Callable[[str], None],
) -> dict[str, int]:
    """The site-by-site phase, within ``seconds``: each block's first half on the original's inputs at its
    site, then the second half on those and the inputs the rewritten model gives it there. Each half gets an
    equal share of the time still left, so that what the checks between them take comes out of the later
    ones. Returns the steps taken per site."""
    deadline = time.perf_counter() + seconds
    halves = 2 * len(sites)

    def share() -> float:
        nonlocal halves
        halves -= 1
        return max(deadline - time.perf_counter(), 0.0) / (halves + 1)

    steps = {}
    for number, site in enumerate(sites, 1):
        say(f"{site.path} ({number}/{len(sites)}): fitting on the original's inputs")
        steps[site.path] = fit(site.path, calls[site.path], share())
    with _modes_kept(rewritten), torch.no_grad():
        rewritten.eval()
        own, _ = _record(rewritten, sites, inputs, in_original=False)
    for number, site in enumerate(sites, 1):
        if len(own[site.path]) != len(calls[site.path]):  # its calls do not pair up: it keeps its first half
            continue
        say(f"{site.path} ({number}/{len(sites)}): fitting on its own inputs as well")
        # Both inputs, each with the original's output: fitted to its own inputs alone, a block learns to lean
        # on what the blocks before it got wrong in the first half, and those move again in this one.
        own_pairs = [(args, target) for (args, _), (_, target) in zip(own[site.path], calls[site.path])]
        steps[site.path] += fit(
            site.path, [pair for both in zip(own_pairs, calls[site.path]) for pair in both], share()
        )
    return steps


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
    model: nn.Module, sites: list[_Site], inputs: list[tuple], *, in_original: bool
) -> tuple[dict[str, list[tuple[tuple, Any]]], list[Any]]:
    """Run ``model`` on every batch: each site's calls (positional inputs, output: in the original, what the
    site's modules compute together) and the model's outputs."""
    calls: dict[str, list[tuple[tuple, Any]]] = {site.path: [] for site in sites}

    def recorder(path: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            # Copies: the forward may go on to change either in place (`out += identity`, an in-place ReLU).
            calls[path].append((_copied(args), _copied(output)))

        return hook

    with _hooks({site.path: model.get_submodule(site.path) for site in sites}, recorder):
        outputs = [_detached(model(*x)) for x in inputs]
    if in_original:  # a chain's rest runs after the hooks are gone (a module of it may be called elsewhere)
        for site in sites:
            calls[site.path] = [(args, _detached(site.target(output))) for args, output in calls[site.path]]
    return calls, outputs


def _errors_in_place(
    rewritten: nn.Module,
    sites: list[_Site],
    inputs: list[tuple],
    calls: dict[str, list[tuple[tuple, Any]]],
    targets: list[Any],
) -> tuple[dict[str, float], float]:
    """Eval-mode relative errors of each new block inside ``rewritten`` against the original's calls, and of
    the whole model's outputs against the original's."""
    with _modes_kept(rewritten), torch.no_grad():
        rewritten.eval()
        seen, outputs = _record(rewritten, sites, inputs, in_original=False)
    errors = {}
    for site in sites:
        count = min(len(seen[site.path]), len(calls[site.path]))
        errors[site.path] = _relative_error(
            [output for _, output in seen[site.path][:count]],
            [target for _, target in calls[site.path][:count]],
        )
    return errors, _relative_error(outputs, targets)


def _model_error(model: nn.Module, inputs: list[tuple], targets: list[Any]) -> float:
    with _modes_kept(model), torch.no_grad():
        model.eval()
        return _relative_error((model(*args) for args in inputs), targets)


def _fit_half(
    block: nn.Module,
    pairs: list[tuple[tuple, Any]],
    *,
    seconds: float,
    lr: float,
    train_mode: bool,
    bfloat16: bool = False,
) -> int:
    """Fit ``block`` to ``pairs`` (inputs, target output) for ``seconds``, in train mode followed by a
    re-estimate of its statistics, or in eval mode (statistics kept), forward passes in bfloat16 autocast with
    ``bfloat16``; undone if no closer. Returns the steps taken."""
    if not pairs:
        return 0
    checked = pairs[:_CHECKED]
    with _modes_kept(block):
        before = _block_error(block, checked)
        kept = {name: value.clone() for name, value in block.state_dict().items()}
        block.train(train_mode)

        def loss(args: tuple, target: Any) -> Tensor:
            with _autocast(block, bfloat16):
                output = block(*args)
            return _squared_relative(_as_float32(output), target)

        taken = _fit(block, list(block.parameters()), loss, pairs, lr, seconds)
        if train_mode:
            _estimate_statistics(block, checked, _norms(block))
        # A diverged or futile fit: hand the block back as it came.
        if not _block_error(block, checked) < before:
            block.load_state_dict(kept)
    return taken


def _native_bfloat16(model: nn.Module) -> bool:
    """Whether the device of ``model``'s parameters multiplies bfloat16 natively (then autocast is faster)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# Slim-neck YOLOv5-S, 720 end-to-end steps: 0.0243 of relative error this way (0.0242 with 20 % of cooldown,
# 0.0247 with 50 %), 0.0280 with a cosine decay over all steps, 0.0274 with a linear one. The error still falls
# fast at full rate; a decay that starts early gives that away.
_COOLDOWN = 0.3


def _fit(
    model: nn.Module,
    trained: list[nn.Parameter],
    loss: Callable[[tuple, Any], Tensor],
    pairs: list[tuple[tuple, Any]],
    lr: float,
    seconds: float,
) -> int:
    """Train the ``trained`` parameters on ``loss(inputs, target)`` cycling over ``pairs`` for ``seconds``:
    Adam, ``lr`` held, then decayed linearly to zero over the last ``_COOLDOWN`` of the time. Returns the steps
    taken (at least one).

    Modes are the caller's: in train mode BatchNorm normalises by each batch's statistics, which keeps a fit
    from random weights well conditioned while they move (with fixed statistics, the activations' scale
    drifts and the fit crawls); in eval mode the statistics stay, and the block computes what it learnt.
    Every other parameter of ``model`` is frozen meanwhile, so that no gradient is computed for it.
    """
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
                # The first step is taken at full rate whatever the time: a budget spent before it still gets it.
                spent = ((time.perf_counter() - start) / seconds if seconds > 0 else 1.0) if taken else 0.0
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
    lr: float,
    seconds: float,
    bfloat16: bool = False,
) -> tuple[int, list[str]]:
    """Train ``blocks`` together, in eval mode, with the modules that run only after the first block has
    started, on the whole ``model``'s relative output error (forward passes in bfloat16 autocast with
    ``bfloat16``), for ``seconds``; undone if no better. Returns the steps taken and the paths of those modules.

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
        tuned = _downstream(model, order)
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

            references = [_squared_norms(target) for target in targets]

            def loss(args: tuple, target_and_index: tuple[Any, int]) -> Tensor:
                target, index = target_and_index
                with _autocast(model, bfloat16):
                    output = replayed(index, args)
                return _squared_relative(_as_float32(output), target, references[index])

            pairs = [(args, (target, index)) for index, (args, target) in enumerate(zip(inputs, targets))]
            taken = _fit(model, trained, loss, pairs, lr, seconds)
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
    """The root mean, over the tensors an output holds, of ``||output - target||² / ||target||²`` per tensor,
    each summed over all batches.

    Per tensor, not over all of them as one vector: a detector's outputs hold boxes decoded in pixels beside
    raw maps and class scores, and the pixel coordinates would outweigh everything else by orders of magnitude.
    """
    difference: dict[int, float] = {}
    reference: dict[int, float] = {}
    for output, target in zip(outputs, targets, strict=True):
        for k, (new, old) in enumerate(zip(_tensors(output), _tensors(target), strict=True)):
            difference[k] = difference.get(k, 0.0) + float((new.float() - old.float()).square().sum())
            reference[k] = reference.get(k, 0.0) + float(old.float().square().sum())
    ratios = [d / reference[k] if reference[k] else d for k, d in difference.items()]
    return math.sqrt(sum(ratios) / len(ratios)) if ratios else 0.0


def _squared_relative(output: Any, target: Any, references: list[Tensor] | None = None) -> Tensor:
    """The mean, over the tensors ``output`` holds, of ``||output - target||² / ||target||²`` per tensor (see
    :func:`_relative_error`); ``references`` are the targets' ``||target||²`` when the caller has them already
    (a target seen at every step)."""
    pairs = list(zip(_tensors(output), _tensors(target), strict=True))
    if references is None:
        references = _squared_norms(target)
    # mse_loss is one kernel forward and one backward: half the time of a difference squared and summed.
    ratios = [
        F.mse_loss(new, old, reduction="sum") / reference.clamp_min(1e-12)
        for (new, old), reference in zip(pairs, references, strict=True)
    ]
    return sum(ratios) / len(ratios)


def _squared_norms(value: Any) -> list[Tensor]:
    return [t.detach().float().square().sum() for t in _tensors(value)]


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


def _copied(value: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, value)


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
