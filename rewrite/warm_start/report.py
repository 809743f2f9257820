"""What a warm start did: per new block, its relative error before and after (:class:`SiteFit`), and for the
whole model (:class:`WarmStartReport`, whose ``str()`` is a table)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tabulate import tabulate


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
