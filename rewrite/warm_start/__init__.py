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

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from rewrite.errors import InputSpecError, NoMatchError
from rewrite.execution import attributes_restored
from rewrite.planner import Plan
from rewrite.warm_start.end_to_end import fit_end_to_end
from rewrite.warm_start.fitting import copy_from_replaced, fit_half, fit_sites, native_bfloat16
from rewrite.warm_start.measure import CHECKED, channels_last, errors_in_place, model_error, record
from rewrite.warm_start.report import SiteFit, WarmStartReport
from rewrite.warm_start.sites import BlockSite, changed_modules, resolve_sites

__all__ = ["SiteFit", "WarmStartReport", "changed_modules", "warm_start"]

# The budget's split: the share of the time left after recording that the site-by-site fits get; the end-to-end
# steps get the rest. Block-sized fitting steps do far more in a short budget than whole-model steps do
# (bench/README.md, warm_start.py, has what each share measured).
_SITE_SHARE = 0.75
_SITE_LR = 1e-2  # a block fitted from fresh weights; one that copied its replaced module's gets a tenth
_END_TO_END_LR = 3e-4


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
    inputs = [channels_last(batch if isinstance(batch, tuple) else (batch,)) for batch in batches]
    if not inputs:
        raise InputSpecError("warm_start: `batches` gave nothing; pass an iterable of input tensors")
    resolved, skipped = resolve_sites(rewritten, original, sites, inputs[0])
    if not resolved:
        why = f" ({'; '.join(f'{path}: {reason}' for path, reason in skipped.items())})" if skipped else ""
        raise NoMatchError(
            f"warm_start: {type(rewritten).__name__} has no new block to train against "
            f"{type(original).__name__}{why}; pass the result of rewrite.apply() on the original"
        )
    run = _Run(rewritten, original, resolved, inputs, say)
    run.copy_weights()
    run.fit_sites(deadline)
    run.fit_end_to_end(deadline)
    fits, model_after = run.measured_after()
    return WarmStartReport(
        fits,
        run.model_before,
        model_after,
        len(inputs),
        time.perf_counter() - start,
        seconds,
        run.end_to_end_steps,
        run.tuned,
        skipped,
    )


class _Run:
    """One warm start's phases and what they share: the original's recorded calls and outputs, the checks that
    judge each phase, and what each phase did."""

    def __init__(
        self,
        rewritten: nn.Module,
        original: nn.Module,
        sites: list[BlockSite],
        inputs: list[tuple],
        say: Callable[[str], None],
    ) -> None:
        self.rewritten, self.sites, self.inputs, self.say = rewritten, sites, inputs, say
        self.compared = [site for site in sites if site.replaced is not None]
        # attributes_restored: the original's modes, and whatever its forward caches, go back as they were.
        with attributes_restored(original), torch.no_grad():
            original.eval()
            say(
                f"recording the original's features at {len(self.compared)} site(s) on {len(inputs)} batch(es)"
            )
            self.calls, self.targets = record(original, self.compared, inputs, in_original=True)
        # The errors, and the checks that judge each phase, run on the first few batches: a fraction of a pass.
        self.checked = (inputs[:CHECKED], self.targets[:CHECKED])
        measured = time.perf_counter()
        self.sites_before, self.model_before = errors_in_place(
            rewritten, self.compared, self.checked[0], self.calls, self.checked[1]
        )
        # What a forward pass of the rewritten model over one batch costs: what the passes still to come will.
        self.per_batch = (time.perf_counter() - measured) / len(self.checked[0])
        self.blocks = [rewritten.get_submodule(site.path) for site in sites]
        self.error = self.model_before
        self.copied: set[str] = set()
        self.steps: dict[str, int] = {}
        self.end_to_end_steps, self.tuned = 0, []
        self.bfloat16 = False

    def judged(self, phase: Callable[[], bool], name: str) -> bool:
        """Run ``phase`` (which says whether it changed anything); undo what it did to the blocks unless it
        brought the whole model closer. Each block closer to its own targets, they may still take the model
        further away together (their errors add up)."""
        kept = [copy.deepcopy(block.state_dict()) for block in self.blocks]
        if not phase():
            return False
        now = model_error(self.rewritten, *self.checked)
        if now < self.error:
            self.error = now
            return True
        self.say(f"{name} left the whole model no closer ({self.error:.4f} → {now:.4f}): undone")
        for block, state in zip(self.blocks, kept):
            block.load_state_dict(state)
        return False

    def copy_weights(self) -> None:
        """Blocks with a ``warm_start_from`` method copy the replaced modules' weights where they can."""

        def copy_all() -> bool:
            for site in self.compared:
                block = self.rewritten.get_submodule(site.path)
                if copy_from_replaced(block, site.replaced, self.calls[site.path][:CHECKED]):
                    self.copied.add(site.path)
            return bool(self.copied)

        if self.compared and self.judged(copy_all, "the copies"):
            copied = ", ".join(sorted(self.copied))
            self.say(f"copied the replaced modules' weights into {len(self.copied)} block(s): {copied}")
        else:
            self.copied.clear()

    def fit_sites(self, deadline: float) -> None:
        """Each block on its own, within its share of what is left once the passes still to come are paid for
        (its check, the errors after)."""
        self.bfloat16 = native_bfloat16(self.rewritten)
        share = _SITE_SHARE * (deadline - time.perf_counter() - 2 * len(self.checked[0]) * self.per_batch)
        if not self.compared or share <= 0:
            return

        def fit(path: str, pairs: list[tuple[tuple, Any]], seconds: float) -> int:
            fresh = path not in self.copied
            return fit_half(
                self.rewritten.get_submodule(path),
                pairs,
                seconds=seconds,
                lr=_SITE_LR if fresh else _SITE_LR / 10,
                train_mode=fresh,
                bfloat16=self.bfloat16,
            )

        def fit_all() -> bool:
            self.steps.update(
                fit_sites(self.rewritten, self.compared, self.inputs, self.calls, fit, share, self.say)
            )
            return True

        if not self.judged(fit_all, "the fits"):
            self.steps.clear()

    def fit_end_to_end(self, deadline: float) -> None:
        """All blocks together with what runs after them, in the time left once the passes still to come are
        paid for: recording the model's prefix and measuring twice (both replayed: cheaper than a whole pass),
        then the errors after."""
        passes = 2 * len(self.inputs) + len(self.checked[0])
        left = deadline - time.perf_counter() - passes * self.per_batch
        if left <= 0:
            return
        self.say(f"all {len(self.sites)} block(s) together on the whole model's outputs, {left:.1f} s")
        self.end_to_end_steps, self.tuned = fit_end_to_end(
            self.rewritten,
            self.blocks,
            self.inputs,
            self.targets,
            lr=_END_TO_END_LR,
            seconds=left,
            bfloat16=self.bfloat16,
        )

    def measured_after(self) -> tuple[list[SiteFit], float]:
        """Per site what it replaced, its block and its errors before and after; the whole model's after."""
        sites_after, model_after = errors_in_place(
            self.rewritten, self.compared, self.checked[0], self.calls, self.checked[1]
        )
        fits = []
        for site in self.sites:
            new = type(self.rewritten.get_submodule(site.path)).__name__
            before, after = self.sites_before.get(site.path), sites_after.get(site.path)
            steps = self.steps.get(site.path, 0)
            fits.append(SiteFit(site.path, site.name, new, before, after, site.path in self.copied, steps))
            if before is not None:
                self.say(f"{site.path}: {site.name} → {new}, rel. error {before:.4f} → {after:.4f}")
        self.say(f"whole model: rel. error {self.model_before:.4f} → {model_after:.4f}")
        return fits, model_after
