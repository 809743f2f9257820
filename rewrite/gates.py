"""CI gates: limits on a plan's figures *after* the rewrite ("at most 100 G FLOPs", "at least 10 % fewer
params"), each checked into a :class:`GateResult` that says whether it passed and by how much.

The policy lives here; :mod:`rewrite.report` only renders the results, and ``rewrite plan`` turns a failed
gate into exit code 1::

    p = plan(model, "slim-neck", (torch.rand(1, 3, 640, 640),))
    gates = check_gates(p, max_flops=100_000_000_000, min_flops_reduction=10.0)
    print(render(p, "markdown", gates=gates))
    [gate.detail for gate in gates if not gate.passed]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a gate reads only a plan's figures
    from rewrite.planner import Plan

__all__ = ["GateResult", "check_gates"]


@dataclass(frozen=True)
class GateResult:
    """One CI gate checked against a plan: ``measured`` must stay at or under (``limit="max"``) or reach
    (``limit="min"``) the ``threshold``.

    >>> gate = GateResult("max-flops", "max", threshold=100e9, measured=96_927_744_000, unit="FLOPs")
    >>> gate.passed, gate.detail
    (True, '3,072,256,000 FLOPs to spare')
    >>> GateResult("min-flops-reduction", "min", threshold=12.0, measured=11.07, unit="%").detail
    'missed by 0.93 percentage points'
    """

    gate: str  # the command-line option without its dashes, e.g. "max-flops"
    limit: str  # "max" or "min"
    threshold: float
    measured: float
    unit: str  # "params", "FLOPs", "%" or "rules"

    @property
    def margin(self) -> float:
        """How far inside the threshold the measurement is; negative when the gate failed."""
        return self.threshold - self.measured if self.limit == "max" else self.measured - self.threshold

    @property
    def passed(self) -> bool:
        return self.margin >= 0

    @property
    def detail(self) -> str:
        if self.unit == "rules":  # pass or fail, the count says it all: "1 rule to spare" would read oddly
            return f"{self.measured} rule{'' if self.measured == 1 else 's'} matched nothing"
        amount = _amount(abs(self.margin), self.unit)
        return f"{amount} to spare" if self.passed else f"missed by {amount}"


def check_gates(
    plan: Plan,
    *,
    fail_on_no_match: bool = False,
    max_params: int | None = None,
    max_flops: int | None = None,
    min_params_reduction: float | None = None,
    min_flops_reduction: float | None = None,
) -> list[GateResult]:
    """The gates that were asked for, in this order, checked against the figures *after* the rewrite.

    Reductions are percentages of the "before" figure (``14.2`` means 14.2 % fewer); ``fail_on_no_match`` asks
    that every rule match something in scope (so a rule set that rewrites nothing fails too).
    """
    gates = []
    if fail_on_no_match:
        gates.append(GateResult("fail-on-no-match", "max", 0, len(plan.unmatched_rules), "rules"))
    if max_params is not None:
        gates.append(GateResult("max-params", "max", max_params, plan.params.after, "params"))
    if max_flops is not None:
        gates.append(GateResult("max-flops", "max", max_flops, plan.flops.after, "FLOPs"))
    if min_params_reduction is not None:
        gates.append(
            GateResult("min-params-reduction", "min", min_params_reduction, -plan.params.percent, "%")
        )
    if min_flops_reduction is not None:
        gates.append(GateResult("min-flops-reduction", "min", min_flops_reduction, -plan.flops.percent, "%"))
    return gates


def _amount(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.2f} percentage points"
    return f"{value:,.0f} {unit}"
