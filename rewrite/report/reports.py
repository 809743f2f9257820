"""What each report holds: a plan's, a profile's and a comparison's :class:`~rewrite.report.document.Document`.

Rows carry the raw figures (what the JSON holds) and columns say how people read them, so every format of a
report comes from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rewrite.gates import GateResult
from rewrite.report.document import (
    Alert,
    Chart,
    Column,
    Document,
    Fact,
    Kind,
    Row,
    Section,
    Table,
    ordered,
    path,
    percent,
    shapes,
    si,
    signed,
)

if TYPE_CHECKING:  # rendering needs only the fields, so the pipeline is not imported to print a report
    from rewrite.planner import BlockSummary, Delta, Plan, SiteChange
    from rewrite.profiler import Cost, Profile
    from rewrite.report.comparison import Comparison

# The plan report's JSON keys, in the order docs/report-schema.md lists them ("gates" ones only with gates).
PLAN_KEYS = (
    "model",
    "rules",
    "scope",
    "input_shapes",
    "device",
    "totals",
    "stages",
    "sites",
    "rejected",
    "leaves",
    "needed_real_data",
    "warnings",
    "nothing_rewritten",
    "shape_check",
    "gates",
    "gates_passed",
)


# The plan


def plan_document(plan: Plan, gates: Sequence[GateResult], gate_label: Callable[[str], str]) -> Document:
    """``gate_label`` names a gate for people: the CLI gives its option (``--max-flops``)."""
    totals = Table(
        [
            Column(""),
            *_delta_columns(None),
            Column(
                "readable", Kind.REWRITE, cell=lambda row: (si(row.data["before"]), si(row.data["after"]))
            ),
        ],
        [Row(_delta(plan.params), "params", "params"), Row(_delta(plan.flops), "flops", "FLOPs")],
    )
    sections = [Section("Totals", totals, key="totals")]
    if gates:
        sections.append(Section("Gates", _gates_table(gates, gate_label), key="gates"))
    sections += [
        _stages_section(plan),
        _sites_section(plan.sites),
        Section(
            f"Rejected candidates ({len(plan.rejected)})",
            Table(
                [
                    Column("path", Kind.PATH, cell=_field("path", path)),
                    Column("rule", cell=_field("rule")),
                    Column("reason", Kind.PROSE, cell=_field("reason")),
                ],
                [Row({"path": r.path, "rule": r.rule, "reason": r.reason}) for r in plan.rejected],
            ),
            key="rejected",
        ),
        _leaf_section(f"Leaves, kept as opaque calls ({len(plan.leaves)})", plan.leaves, "leaves"),
        _leaf_section(
            f"Needed real data, could not run on meta ({len(plan.needed_real_data)})",
            plan.needed_real_data,
            "needed_real_data",
        ),
        Section(f"Warnings ({len(plan.warnings)})", items=list(plan.warnings), key="warnings"),
    ]
    return Document(
        f"rewrite plan: {plan.model_name} with {plan.rule_set}",
        _plan_facts(plan, gates),
        sections,
        _plan_alerts(plan, gates, gate_label),
        report="plan",
        json_order=PLAN_KEYS,
    )


def _plan_facts(plan: Plan, gates: Sequence[GateResult]) -> list[Fact]:
    check = plan.shape_check
    count = len(plan.sites)
    facts = [
        Fact(
            "result",
            plan.nothing_rewritten or f"{count} site{'' if count == 1 else 's'} rewritten",
            key="nothing_rewritten",
            data=plan.nothing_rewritten,
        ),
        Fact("model", plan.model_name, key="model", data=plan.model_name),
        Fact("rules", plan.rule_set, key="rules", data=plan.rule_set),
        Fact("scope", plan.scope or "whole model", key="scope", data=plan.scope),
        Fact("input", shapes(plan.input_shapes), key="input_shapes", data=_shape_lists(plan.input_shapes)),
        Fact("device", plan.device, key="device", data=plan.device),
        Fact(
            "shape check",
            ("passed" if check.passed else "FAILED") + (f": {check.detail}" if check.detail else ""),
            passed=check.passed,
            key="shape_check",
            data={"passed": check.passed, "detail": check.detail},
        ),
    ]
    if gates:
        failed = [g.gate for g in gates if not g.passed]
        facts.append(
            Fact(
                "gates",
                f"FAILED: {', '.join(failed)}" if failed else f"all {len(gates)} passed",
                passed=not failed,
                key="gates_passed",
                data=not failed,
            )
        )
    return facts


def _gates_table(gates: Sequence[GateResult], gate_label: Callable[[str], str]) -> Table:
    def needs(row: Row) -> str:
        gate = row.data
        return ("≤ " if gate["limit"] == "max" else "≥ ") + _gate_value(gate["threshold"], gate["unit"])

    return Table(
        [
            Column("gate", cell=lambda row: gate_label(row.data["gate"])),
            Column("threshold", Kind.NUMBER, cell=needs),
            Column(
                "measured", Kind.NUMBER, cell=lambda row: _gate_value(row.data["measured"], row.data["unit"])
            ),
            Column("result", Kind.VERDICT, cell=lambda row: "pass" if row.data["passed"] else "FAIL"),
            Column("detail", cell=_field("detail")),
        ],
        [
            Row(
                {
                    "gate": g.gate,
                    "limit": g.limit,
                    "threshold": g.threshold,
                    "measured": g.measured,
                    "unit": g.unit,
                    "passed": g.passed,
                    "margin": g.margin,
                    "detail": g.detail,
                },
                failed=not g.passed,
            )
            for g in gates
        ],
    )


def _stages_section(plan: Plan) -> Section:
    stages = ordered(plan.stages)
    columns = [
        Column("stage"),
        *_delta_columns("params", "params"),
        *_delta_columns("FLOPs", "flops"),
    ]
    rows = [
        Row({"params": _delta(change.params), "flops": _delta(change.flops)}, name, name)
        for name, change in stages
    ]
    total = Row({"params": _delta(plan.params), "flops": _delta(plan.flops)}, label="total")
    return Section(
        "Stages",
        Table(columns, rows, footer=[total]),
        charts=_stage_charts(
            [(name, c.params.before, c.params.after) for name, c in stages],
            [(name, c.flops.before, c.flops.after) for name, c in stages],
        ),
        key="stages",
    )


def _sites_section(sites: Sequence[SiteChange]) -> Section:
    columns = [
        Column("path", Kind.PATH, cell=_field("path", path)),
        Column("stage", cell=lambda row: row.data["stage"] or "other"),
        Column("rule", cell=_field("rule")),
        Column("change", Kind.REWRITE, cell=lambda row: (row.data["before"], row.data["after"])),
        *_delta_columns("params", "params"),
        *_delta_columns("FLOPs", "flops"),
    ]
    rows = [
        Row(
            {
                "path": site.path,
                "rule": site.rule,
                "stage": site.stage,
                "kind": site.kind,
                "before": str(site.replaced),
                "after": str(site.replacement),
                "replaced": _block(site.replaced),
                "replacement": _block(site.replacement),
                "params": _delta(site.params),
                "flops": _delta(site.flops),
                "calls": site.calls,
                "untied": site.untied,
            }
        )
        for site in sites
    ]
    return Section(f"Rewritten sites ({len(sites)})", Table(columns, rows), key="sites")


def _plan_alerts(plan: Plan, gates: Sequence[GateResult], gate_label: Callable[[str], str]) -> list[Alert]:
    """Failed gates, a failed shape check, or that every gate passed."""
    alerts = []
    failed = [g for g in gates if not g.passed]
    if failed:
        alerts.append(
            Alert(
                False,
                f"{len(failed)} of {len(gates)} gate{'' if len(gates) == 1 else 's'} failed",
                [
                    f"{gate_label(g.gate)}: needs {'≤' if g.limit == 'max' else '≥'} "
                    f"{_gate_value(g.threshold, g.unit)}, measured {_gate_value(g.measured, g.unit)}: {g.detail}"
                    for g in failed
                ],
            )
        )
    if not plan.shape_check.passed:
        alerts.append(
            Alert(False, "Shape check failed", [plan.shape_check.detail] if plan.shape_check.detail else [])
        )
    if gates and not failed:
        alerts.append(Alert(True, f"All {len(gates)} gate{'' if len(gates) == 1 else 's'} passed"))
    return alerts


def _field(key: str, shown: Callable[[Any], str] = str) -> Callable[[Row], str]:
    """A column's cell: the row's figure ``key``, as ``shown``."""
    return lambda row: shown(row.data[key])


def _delta(delta: Delta) -> dict[str, int | float]:
    return {"before": delta.before, "after": delta.after, "change": delta.change, "percent": delta.percent}


def _block(block: BlockSummary) -> dict[str, Any]:
    return {
        "type_name": block.type_name,
        "in_channels": block.in_channels,
        "out_channels": block.out_channels,
        "kernel_size": block.kernel_size,
        "stride": block.stride,
        "n": block.n,
    }


def _delta_columns(what: str | None, key: str | None = None) -> list[Column]:
    """Before, after and the change of one figure, the row's ``key`` (its data itself for ``None``): four
    numbers, grouped under ``what`` in HTML; ``what`` is ``None`` in a table of one figure per row, whose
    headers then name no figure."""

    def number(name: str, shown: Callable[[Any], str]) -> Callable[[Row], str]:
        return lambda row: shown((row.data if key is None else row.data[key])[name])

    cells = [
        number("before", "{:,}".format),
        number("after", "{:,}".format),
        number("change", signed),
        number("percent", percent),
    ]
    if what is None:
        headers = ["before", "after", "change", "change %"]
        return [Column(header, Kind.NUMBER, cell=cell) for header, cell in zip(headers, cells)]
    headers = [f"{what} before", f"{what} after", f"Δ {what}", "Δ %"]
    shorts = ["before", "after", "Δ", "Δ %"]
    return [
        Column(header, Kind.NUMBER, what, short, cell) for header, short, cell in zip(headers, shorts, cells)
    ]


def _gate_value(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.2f}%"
    if unit == "rules":
        return f"{value:,.0f} rule" + ("" if value == 1 else "s")
    return f"{value:,.0f} ({si(value)})"


# The profile


def profile_document(profile: Profile, model_name: str, input_shapes: Sequence[Sequence[int]]) -> Document:
    total = profile.total
    facts = [
        Fact("model", model_name, key="model", data=model_name),
        Fact("input", shapes(input_shapes), key="input_shapes", data=_shape_lists(input_shapes)),
        Fact("device", profile.device, key="device", data=profile.device),
    ]

    def share(row: Row) -> str:
        return f"{100.0 * row.data['flops'] / total.flops if total.flops else 0.0:.1f}%"

    costs = [
        Column("params", Kind.NUMBER, cell=_field("params", "{:,}".format)),
        Column("FLOPs", Kind.NUMBER, cell=_field("flops", "{:,}".format)),
        Column("MACs", Kind.NUMBER, cell=_field("macs", "{:,}".format)),
        Column("FLOPs share", Kind.NUMBER, cell=share),
    ]
    stages = ordered(profile.stages)
    blocks = _top_level_blocks(profile.modules)
    totals = Table(
        [
            Column(""),
            Column("count", Kind.NUMBER, cell=lambda row: f"{row.data:,}"),
            Column("readable", Kind.NUMBER, cell=lambda row: si(row.data)),
        ],
        [
            Row(total.params, "params", "params"),
            Row(total.flops, "flops", "FLOPs"),
            Row(total.macs, "macs", "MACs"),
        ],
    )
    sections = [
        Section("Total", totals, key="totals"),
        Section(
            "Stages",
            Table([Column("stage"), *costs], [Row(_cost(c), name, name) for name, c in stages]),
            charts=_stage_charts(
                [(name, c.params, None) for name, c in stages], [(name, c.flops, None) for name, c in stages]
            ),
            key="stages",
        ),
        Section(
            f"Top-level modules ({len(blocks)})",
            Table(
                [Column("module", Kind.PATH, cell=_field("path", path)), *costs],
                [Row({"path": p, **_cost(c)}) for p, c in blocks],
            ),
            key="modules",
        ),
        _leaf_section(
            f"Needed real data, could not run on meta ({len(profile.needed_real_data)})",
            profile.needed_real_data,
            "needed_real_data",
        ),
    ]
    return Document(f"rewrite profile: {model_name}", facts, sections, report="profile")


def _cost(cost: Cost) -> dict[str, int]:
    return {"params": cost.params, "flops": cost.flops, "macs": cost.macs}


def _top_level_blocks(modules: dict[str, Any]) -> list[tuple[str, Any]]:
    """The children of the first module below the root that has more than one child: for YOLOv5 that skips the
    ``model`` Sequential wrapper and lists ``model.0`` … ``model.24``.

    >>> _top_level_blocks({"": 3, "model": 3, "model.0": 1, "model.0.conv": 1, "model.1": 2})
    [('model.0', 1), ('model.1', 2)]
    """
    parent = ""
    while True:
        prefix = f"{parent}." if parent else ""
        children = [
            p for p in modules if p.startswith(prefix) and p != parent and "." not in p[len(prefix) :]
        ]
        if len(children) != 1:
            return [(p, modules[p]) for p in children]
        parent = children[0]


# A comparison of two trained detectors


def comparison_document(comparison: Comparison) -> Document:
    """People's side-by-side table; it has no JSON form."""
    base, slim = comparison.base, comparison.slim
    facts = [
        Fact("base", base.name),
        Fact("slim", slim.name),
        Fact("data", comparison.data),
        Fact("input", shapes([(1, 3, comparison.imgsz, comparison.imgsz)])),
        Fact("device", comparison.device),
    ]

    def row(label: str, before: float, after: float, shown: str, change: str) -> Row:
        # People alone read this table: a row's data is its cells, each figure in its own format.
        percent_change = 100.0 * (after - before) / before if before else 0.0
        cells = [
            shown.format(before),
            shown.format(after),
            change.format(after - before),
            percent(percent_change),
        ]
        return Row(cells, label=label)

    headers = ("base", "slim", "change", "change %")
    table = Table(
        [
            Column(""),
            *(Column(h, Kind.NUMBER, cell=lambda r, i=i: r.data[i]) for i, h in enumerate(headers)),
        ],
        [
            row("params", base.params, slim.params, "{:,}", "{:+,}"),
            row("FLOPs", base.flops, slim.flops, "{:,}", "{:+,}"),
            row("latency (ms)", base.latency_ms, slim.latency_ms, "{:.2f}", "{:+.2f}"),
            row("mAP50", base.map50, slim.map50, "{:.4f}", "{:+.4f}"),
            row("mAP50-95", base.map50_95, slim.map50_95, "{:.4f}", "{:+.4f}"),
        ],
    )
    notes = [
        "FLOPs per image, counted by rewrite.profile; latency: median forward pass at batch 1, BatchNorm folded",
        "mAP: ultralytics' validation on the data's validation split",
    ]
    return Document(
        f"rewrite compare: {base.name} vs {slim.name}",
        facts,
        [Section("Side by side", table), Section("How it was measured", items=notes)],
    )


# Shared by the reports


def _stage_charts(
    params: list[tuple[str, int, int | None]], flops: list[tuple[str, int, int | None]]
) -> list[Chart]:
    """Params and FLOPs per stage, as bars; a plan's rows carry (stage, before, after), a profile's (stage,
    value, None)."""
    # A stage with nothing in it (often "other") would only be an empty row; both charts keep the same rows.
    shown = {stage for stage, before, after in params + flops if before or after}
    return [
        Chart("params per stage", [row for row in params if row[0] in shown]),
        Chart("FLOPs per stage", [row for row in flops if row[0] in shown]),
    ]


def _leaf_section(title: str, leaves: Sequence[Any], key: str) -> Section:
    return Section(
        title,
        Table(
            [
                Column("path", Kind.PATH, cell=_field("path", path)),
                Column("type", cell=_field("type_name")),
                Column("reason", Kind.PROSE, cell=_field("reason")),
            ],
            [Row({"path": x.path, "type_name": x.type_name, "reason": x.reason}) for x in leaves],
        ),
        key=key,
    )


def _shape_lists(input_shapes: Sequence[Sequence[int]]) -> list[list[int]]:
    return [list(shape) for shape in input_shapes]
