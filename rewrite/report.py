"""One function, many formats: a ``Plan`` (or a ``Profile``) as text, markdown, JSON or one HTML file.

Text and markdown are for people (thousands separators, readable ``46.56 M`` columns); JSON is for
machines (the versioned schema of ``docs/report-schema.md``); HTML is one self-contained file, no network
needed, that CI can upload as an artifact. Gates (:mod:`rewrite.gates`) are checked elsewhere and rendered
here, so that the report can say which gate missed and by how much::

    p = plan(model, "slim-neck", (torch.rand(1, 3, 640, 640),))
    gates = check_gates(p, max_flops=100_000_000_000, min_flops_reduction=10.0)
    print(render(p, "markdown", gates=gates))
    data = json.loads(render(p, "json", gates=gates))
    data["totals"]["flops"]["percent"], [g["passed"] for g in data["gates"]]

Every format is drawn from one document: sections whose tables say what each column holds (a number, a
module path, a rewrite's before and after …) and which charts go with them, so no renderer has to recognise a
section by its title or take a cell's text apart again.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

# Gate policy lives in rewrite.gates; both names stay importable from here, where they used to live.
from rewrite.gates import GateResult, check_gates

if TYPE_CHECKING:  # rendering needs only the fields, so the pipeline is not imported to print a report
    from rewrite.integrations.ultralytics import Comparison
    from rewrite.planner import BlockSummary, Delta, Plan
    from rewrite.profiler import Profile

__all__ = [
    "FORMATS",
    "JSON_SCHEMA_VERSION",
    "GateResult",
    "check_gates",
    "render",
    "render_comparison",
    "render_profile",
]

# Bump on any change that can break a consumer (a key removed, renamed or changing meaning), not for new keys.
JSON_SCHEMA_VERSION = 1
FORMATS = ("text", "markdown", "json", "html")
_STAGE_ORDER = ("backbone", "neck", "head", "other")
# Free-text columns wrap at this width in the text format: one long fx error must not make a 300-column table.
_TEXT_WRAP = 60


# Entry points


def render(plan: Plan, fmt: str = "text", *, gates: Sequence[GateResult] = ()) -> str:
    """The plan as ``fmt`` ("text", "markdown", "json" or "html"); ends with a newline.

    ``gates`` (from ``check_gates``) adds a gates section, and the JSON key ``gates``.
    """
    _check_format(fmt)
    if fmt == "json":
        return _dump_json(_plan_json(plan, gates))
    return _render_document(_plan_document(plan, gates), fmt)


def render_profile(
    profile: Profile, fmt: str = "text", *, model_name: str, input_shapes: Sequence[Sequence[int]]
) -> str:
    """A profile (params / FLOPs / MACs per stage, per top-level block and in total) as ``fmt``.

    ``profile`` does not know what it measured, so the model's name and the input shapes are passed in.
    """
    _check_format(fmt)
    blocks = _top_level_blocks(profile.modules)
    if fmt == "json":

        def cost(c: Any) -> dict[str, int]:
            return {"params": c.params, "flops": c.flops, "macs": c.macs}

        return _dump_json(
            {
                "schema_version": JSON_SCHEMA_VERSION,
                "report": "profile",
                "model": model_name,
                "input_shapes": [list(shape) for shape in input_shapes],
                "device": profile.device,
                "totals": cost(profile.total),
                "stages": {name: cost(c) for name, c in _ordered(profile.stages)},
                "modules": [{"path": path, **cost(c)} for path, c in blocks],
                "needed_real_data": [_leaf_json(leaf) for leaf in profile.needed_real_data],
            }
        )
    return _render_document(_profile_document(profile, blocks, model_name, input_shapes), fmt)


def render_comparison(comparison: Comparison, fmt: str = "text") -> str:
    """Two detectors side by side (params, FLOPs, latency, mAP50, mAP50-95, as
    :func:`rewrite.integrations.ultralytics.compare` measured them) as ``fmt``: "text", "markdown" or "html"."""
    _check_format(fmt)
    if fmt == "json":
        raise ValueError("a comparison renders as text, markdown or html")
    return _render_document(_comparison_document(comparison), fmt)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _render_document(doc: _Document, fmt: str) -> str:
    if fmt == "html":
        return _html(doc)
    return _markdown(doc) if fmt == "markdown" else _text(doc)


# JSON


def _plan_json(plan: Plan, gates: Sequence[GateResult]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schema_version": JSON_SCHEMA_VERSION,
        "report": "plan",
        "model": plan.model_name,
        "rules": plan.rule_set,
        "scope": plan.scope,
        "input_shapes": [list(shape) for shape in plan.input_shapes],
        "device": plan.device,
        "totals": {"params": _delta_json(plan.params), "flops": _delta_json(plan.flops)},
        "stages": {
            name: {"params": _delta_json(change.params), "flops": _delta_json(change.flops)}
            for name, change in _ordered(plan.stages)
        },
        "sites": [
            {
                "path": site.path,
                "rule": site.rule,
                "stage": site.stage,
                "kind": site.kind,
                "before": str(site.replaced),
                "after": str(site.replacement),
                "replaced": _block_json(site.replaced),
                "replacement": _block_json(site.replacement),
                "params": _delta_json(site.params),
                "flops": _delta_json(site.flops),
                "calls": site.calls,
                "untied": site.untied,
            }
            for site in plan.sites
        ],
        "rejected": [{"path": r.path, "rule": r.rule, "reason": r.reason} for r in plan.rejected],
        "leaves": [_leaf_json(leaf) for leaf in plan.leaves],
        "needed_real_data": [_leaf_json(leaf) for leaf in plan.needed_real_data],
        "warnings": list(plan.warnings),
        "nothing_rewritten": plan.nothing_rewritten,
        "shape_check": {"passed": plan.shape_check.passed, "detail": plan.shape_check.detail},
    }
    if gates:
        data["gates"] = [
            {
                "gate": g.gate,
                "limit": g.limit,
                "threshold": _rounded(g.threshold),
                "measured": _rounded(g.measured),
                "unit": g.unit,
                "passed": g.passed,
                "margin": _rounded(g.margin),
                "detail": g.detail,
            }
            for g in gates
        ]
        data["gates_passed"] = all(g.passed for g in gates)
    return data


def _delta_json(delta: Delta) -> dict[str, int | float]:
    return {
        "before": delta.before,
        "after": delta.after,
        "change": delta.change,
        "percent": _rounded(delta.percent),
    }


def _block_json(block: BlockSummary) -> dict[str, Any]:
    return {
        "type_name": block.type_name,
        "in_channels": block.in_channels,
        "out_channels": block.out_channels,
        "kernel_size": block.kernel_size,
        "stride": block.stride,
        "n": block.n,
    }


def _rounded(value: float) -> int | float:
    """Counts stay exact; percentages are rounded, so float noise never shows up in a diff of two reports."""
    return value if isinstance(value, int) else round(value, 4)


def _leaf_json(leaf: Any) -> dict[str, str]:
    return {"path": leaf.path, "type_name": leaf.type_name, "reason": leaf.reason}


def _dump_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# One document, three renderers (text, markdown, HTML)


class _Kind(Enum):
    """What a column holds, which decides how each format shows it."""

    TEXT = "text"
    NUMBER = "number"  # already formatted; right-aligned
    PROSE = "prose"  # free text (an fx error …): wrapped in the text format and in HTML
    PATH = "path"  # a module path: HTML may break it after a dot
    REWRITE = "rewrite"  # a (before, after) pair, "before → after"; HTML breaks it at the arrow only
    VERDICT = "verdict"  # "pass" or "FAIL", coloured in HTML by the row's state


@dataclass(frozen=True)
class _Column:
    header: str
    kind: _Kind = _Kind.TEXT
    # HTML groups a run of columns under one header ("params"), and titles each by ``short`` ("Δ %") beneath it.
    group: str = ""
    short: str = ""


@dataclass
class _Table:
    columns: list[_Column]
    rows: list[list[Any]]  # strings; a REWRITE column's cells are (before, after) pairs of strings
    failed_rows: set[int] = field(default_factory=set)  # highlighted in HTML (failed gates)


@dataclass(frozen=True)
class _Chart:
    """Bars per stage: ``(stage, before, after)`` rows, ``after`` None where there is one state (a profile)."""

    title: str
    rows: list[tuple[str, int, int | None]]


@dataclass
class _Section:
    title: str
    table: _Table | None = None  # None or no rows: the section says "none"
    items: list[str] = field(default_factory=list)  # a bullet list instead of a table
    charts: list[_Chart] = field(default_factory=list)  # drawn under the table in HTML only


@dataclass(frozen=True)
class _Fact:
    label: str
    value: str
    passed: bool | None = None  # a verdict (the shape check, the gates), coloured in HTML


@dataclass(frozen=True)
class _Alert:
    """What a reader must see first, under the title in HTML: failed gates, a failed shape check."""

    ok: bool
    headline: str
    details: list[str] = field(default_factory=list)


@dataclass
class _Document:
    title: str
    facts: list[_Fact]
    sections: list[_Section]
    alerts: list[_Alert] = field(default_factory=list)


def _plan_document(plan: Plan, gates: Sequence[GateResult]) -> _Document:
    check = plan.shape_check
    facts = [
        _Fact(
            "result",
            plan.nothing_rewritten
            or f"{len(plan.sites)} site{'' if len(plan.sites) == 1 else 's'} rewritten",
        ),
        _Fact("model", plan.model_name),
        _Fact("rules", plan.rule_set),
        _Fact("scope", plan.scope or "whole model"),
        _Fact("input", _shapes(plan.input_shapes)),
        _Fact("device", plan.device),
        _Fact(
            "shape check",
            ("passed" if check.passed else "FAILED") + (f": {check.detail}" if check.detail else ""),
            passed=check.passed,
        ),
    ]
    failed = [g for g in gates if not g.passed]
    if gates:
        facts.append(
            _Fact(
                "gates",
                f"FAILED: {', '.join(g.gate for g in failed)}" if failed else f"all {len(gates)} passed",
                passed=not failed,
            )
        )

    totals = _Table(
        [
            _Column(""),
            _Column("before", _Kind.NUMBER),
            _Column("after", _Kind.NUMBER),
            _Column("change", _Kind.NUMBER),
            _Column("change %", _Kind.NUMBER),
            _Column("readable", _Kind.REWRITE),
        ],
        [_total_row("params", plan.params), _total_row("FLOPs", plan.flops)],
    )
    sections = [_Section("Totals", totals)]
    if gates:
        sections.append(
            _Section(
                "Gates",
                _Table(
                    [
                        _Column("gate"),
                        _Column("threshold", _Kind.NUMBER),
                        _Column("measured", _Kind.NUMBER),
                        _Column("result", _Kind.VERDICT),
                        _Column("detail"),
                    ],
                    [
                        [
                            f"--{g.gate}",
                            ("≤ " if g.limit == "max" else "≥ ") + _gate_value(g.threshold, g.unit),
                            _gate_value(g.measured, g.unit),
                            "pass" if g.passed else "FAIL",
                            g.detail,
                        ]
                        for g in gates
                    ],
                    failed_rows={i for i, g in enumerate(gates) if not g.passed},
                ),
            )
        )

    stages = _ordered(plan.stages)
    stage_rows = [[name, *_delta_cells(c.params), *_delta_cells(c.flops)] for name, c in stages]
    stage_rows.append(["total", *_delta_cells(plan.params), *_delta_cells(plan.flops)])
    sections.append(
        _Section(
            "Stages",
            _Table([_Column("stage"), *_delta_columns("params"), *_delta_columns("FLOPs")], stage_rows),
            charts=_stage_charts(
                [(name, c.params.before, c.params.after) for name, c in stages],
                [(name, c.flops.before, c.flops.after) for name, c in stages],
            ),
        )
    )
    sections.append(
        _Section(
            f"Rewritten sites ({len(plan.sites)})",
            _Table(
                [
                    _Column("path", _Kind.PATH),
                    _Column("stage"),
                    _Column("rule"),
                    _Column("change", _Kind.REWRITE),
                    *_delta_columns("params"),
                    *_delta_columns("FLOPs"),
                ],
                [
                    [
                        _path(s.path),
                        s.stage or "other",
                        s.rule,
                        (str(s.replaced), str(s.replacement)),
                        *_delta_cells(s.params),
                        *_delta_cells(s.flops),
                    ]
                    for s in plan.sites
                ],
            ),
        )
    )
    sections.append(
        _Section(
            f"Rejected candidates ({len(plan.rejected)})",
            _Table(
                [_Column("path", _Kind.PATH), _Column("rule"), _Column("reason", _Kind.PROSE)],
                [[_path(r.path), r.rule, r.reason] for r in plan.rejected],
            ),
        )
    )
    sections.append(_leaf_section(f"Leaves, kept as opaque calls ({len(plan.leaves)})", plan.leaves))
    sections.append(
        _leaf_section(
            f"Needed real data, could not run on meta ({len(plan.needed_real_data)})", plan.needed_real_data
        )
    )
    sections.append(_Section(f"Warnings ({len(plan.warnings)})", items=list(plan.warnings)))
    return _Document(
        f"rewrite plan: {plan.model_name} with {plan.rule_set}", facts, sections, _plan_alerts(plan, gates)
    )


def _plan_alerts(plan: Plan, gates: Sequence[GateResult]) -> list[_Alert]:
    """Failed gates, a failed shape check, or that every gate passed."""
    alerts = []
    failed = [g for g in gates if not g.passed]
    if failed:
        alerts.append(
            _Alert(
                False,
                f"{len(failed)} of {len(gates)} gate{'' if len(gates) == 1 else 's'} failed",
                [
                    f"--{g.gate}: needs {'≤' if g.limit == 'max' else '≥'} {_gate_value(g.threshold, g.unit)}, "
                    f"measured {_gate_value(g.measured, g.unit)}: {g.detail}"
                    for g in failed
                ],
            )
        )
    if not plan.shape_check.passed:
        alerts.append(
            _Alert(False, "Shape check failed", [plan.shape_check.detail] if plan.shape_check.detail else [])
        )
    if gates and not failed:
        alerts.append(_Alert(True, f"All {len(gates)} gate{'' if len(gates) == 1 else 's'} passed"))
    return alerts


def _profile_document(
    profile: Profile, blocks: list[tuple[str, Any]], model_name: str, input_shapes: Sequence[Sequence[int]]
) -> _Document:
    total = profile.total
    facts = [
        _Fact("model", model_name),
        _Fact("input", _shapes(input_shapes)),
        _Fact("device", profile.device),
    ]

    def cost_cells(cost: Any) -> list[str]:
        share = 100.0 * cost.flops / total.flops if total.flops else 0.0
        return [f"{cost.params:,}", f"{cost.flops:,}", f"{cost.macs:,}", f"{share:.1f}%"]

    costs = [_Column(header, _Kind.NUMBER) for header in ("params", "FLOPs", "MACs", "FLOPs share")]
    stages = _ordered(profile.stages)
    sections = [
        _Section(
            "Total",
            _Table(
                [_Column(""), _Column("count", _Kind.NUMBER), _Column("readable", _Kind.NUMBER)],
                [
                    ["params", f"{total.params:,}", _si(total.params)],
                    ["FLOPs", f"{total.flops:,}", _si(total.flops)],
                    ["MACs", f"{total.macs:,}", _si(total.macs)],
                ],
            ),
        ),
        _Section(
            "Stages",
            _Table([_Column("stage"), *costs], [[name, *cost_cells(c)] for name, c in stages]),
            charts=_stage_charts(
                [(name, c.params, None) for name, c in stages], [(name, c.flops, None) for name, c in stages]
            ),
        ),
        _Section(
            f"Top-level modules ({len(blocks)})",
            _Table([_Column("module", _Kind.PATH), *costs], [[_path(p), *cost_cells(c)] for p, c in blocks]),
        ),
        _leaf_section(
            f"Needed real data, could not run on meta ({len(profile.needed_real_data)})",
            profile.needed_real_data,
        ),
    ]
    return _Document(f"rewrite profile: {model_name}", facts, sections)


def _comparison_document(comparison: Comparison) -> _Document:
    base, slim = comparison.base, comparison.slim
    facts = [
        _Fact("base", base.name),
        _Fact("slim", slim.name),
        _Fact("data", comparison.data),
        _Fact("input", _shapes([(1, 3, comparison.imgsz, comparison.imgsz)])),
        _Fact("device", comparison.device),
    ]

    def row(label: str, before: float, after: float, shown: str, change: str) -> list[str]:
        percent = 100.0 * (after - before) / before if before else 0.0
        return [
            label,
            shown.format(before),
            shown.format(after),
            change.format(after - before),
            _percent(percent),
        ]

    table = _Table(
        [
            _Column(""),
            _Column("base", _Kind.NUMBER),
            _Column("slim", _Kind.NUMBER),
            _Column("change", _Kind.NUMBER),
            _Column("change %", _Kind.NUMBER),
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
    return _Document(
        f"rewrite compare: {base.name} vs {slim.name}",
        facts,
        [_Section("Side by side", table), _Section("How it was measured", items=notes)],
    )


def _stage_charts(
    params: list[tuple[str, int, int | None]], flops: list[tuple[str, int, int | None]]
) -> list[_Chart]:
    """Params and FLOPs per stage, as bars; a plan's rows carry (stage, before, after), a profile's (stage,
    value, None)."""
    # A stage with nothing in it (often "other") would only be an empty row; both charts keep the same rows.
    shown = {stage for stage, before, after in params + flops if before or after}
    return [
        _Chart("params per stage", [row for row in params if row[0] in shown]),
        _Chart("FLOPs per stage", [row for row in flops if row[0] in shown]),
    ]


def _leaf_section(title: str, leaves: Sequence[Any]) -> _Section:
    return _Section(
        title,
        _Table(
            [_Column("path", _Kind.PATH), _Column("type"), _Column("reason", _Kind.PROSE)],
            [[_path(x.path), x.type_name, x.reason] for x in leaves],
        ),
    )


def _total_row(label: str, delta: Delta) -> list[Any]:
    return [label, *_delta_cells(delta), (_si(delta.before), _si(delta.after))]


def _delta_columns(what: str) -> list[_Column]:
    """Before, after and the change of one figure: four numbers, grouped under ``what`` in HTML."""
    return [
        _Column(f"{what} before", _Kind.NUMBER, what, "before"),
        _Column(f"{what} after", _Kind.NUMBER, what, "after"),
        _Column(f"Δ {what}", _Kind.NUMBER, what, "Δ"),
        _Column("Δ %", _Kind.NUMBER, what, "Δ %"),
    ]


def _delta_cells(delta: Delta) -> list[str]:
    return [f"{delta.before:,}", f"{delta.after:,}", _signed(delta.change), _percent(delta.percent)]


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


def _ordered(stages: dict[str, Any]) -> list[tuple[str, Any]]:
    """Stages in pipeline order (backbone, neck, head, other), then any others by name."""
    rank = {name: i for i, name in enumerate(_STAGE_ORDER)}
    return sorted(stages.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def _si(value: float) -> str:
    """A count with an SI suffix, for reading at a glance.

    >>> _si(46_563_709), _si(108_993_740_800), _si(-6_604_928), _si(512)
    ('46.56 M', '108.99 G', '-6.60 M', '512')
    """
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:g}"


def _gate_value(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.2f}%"
    if unit == "rules":
        return f"{value:,.0f} rule" + ("" if value == 1 else "s")
    return f"{value:,.0f} ({_si(value)})"


def _signed(value: int) -> str:
    return f"{value:+,}" if value else "0"


def _percent(value: float) -> str:
    return f"{value:+.2f}%" if value else "0.00%"


def _shapes(shapes: Iterable[Sequence[int]]) -> str:
    return ", ".join("×".join(str(d) for d in shape) for shape in shapes) or "none"


def _path(path: str) -> str:
    return path or "(root)"


# Text


def _text(doc: _Document) -> str:
    width = max(len(fact.label) for fact in doc.facts)
    lines = [doc.title, ""] + [f"  {fact.label:<{width}}  {fact.value}" for fact in doc.facts]
    for section in doc.sections:
        lines += ["", section.title, "-" * len(section.title)]
        if section.items:
            lines += [f"- {item}" for item in section.items]
        elif section.table and section.table.rows:
            table = section.table
            lines.append(
                tabulate(
                    _plain_rows(table),
                    [column.header for column in table.columns],
                    tablefmt="simple",
                    disable_numparse=True,  # "model.10" or "0" stay text; our numbers are already formatted
                    colalign=_colalign(table),
                    maxcolwidths=[
                        _TEXT_WRAP if column.kind is _Kind.PROSE else None for column in table.columns
                    ],
                )
            )
        else:
            lines.append("none")
    return "\n".join(lines) + "\n"


def _plain_rows(table: _Table) -> list[list[str]]:
    """The cells as plain text, for the text and markdown tables."""
    return [
        [
            " → ".join(cell) if column.kind is _Kind.REWRITE else cell
            for column, cell in zip(table.columns, row)
        ]
        for row in table.rows
    ]


def _colalign(table: _Table) -> list[str]:
    return ["right" if column.kind is _Kind.NUMBER else "left" for column in table.columns]


# Markdown


def _markdown(doc: _Document) -> str:
    lines = [f"## {_md(doc.title)}", ""] + [f"- **{fact.label}:** {_md(fact.value)}" for fact in doc.facts]
    for section in doc.sections:
        lines += ["", f"### {_md(section.title)}", ""]
        if section.items:
            lines += [f"- {_md(item)}" for item in section.items]
        elif section.table and section.table.rows:
            table = section.table
            lines.append(
                tabulate(
                    [[_md(cell) for cell in row] for row in _plain_rows(table)],
                    [_md(column.header) for column in table.columns],
                    tablefmt="pipe",  # GitHub's pipe table, with the ":" alignment markers GitHub honours
                    disable_numparse=True,
                    colalign=_colalign(table),
                )
            )
        else:
            lines.append("_none_")
    return "\n".join(lines) + "\n"


_MD_SPECIALS = str.maketrans({c: f"\\{c}" for c in "\\`*_[]|#"})


def _md(value: str) -> str:
    """Text for a markdown line or table cell: GitHub renders inline HTML and markdown, and an fx error
    message such as ``expected <class 'Tensor'>`` would otherwise vanish as a tag.

    >>> _md("a|b <x> *y*")
    'a\\\\|b &lt;x&gt; \\\\*y\\\\*'
    """
    return html.escape(" ".join(str(value).split()), quote=False).translate(_MD_SPECIALS)


# HTML

_CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1f2328;
       margin: 2rem auto; max-width: 1400px; padding: 0 1rem; }
svg { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
h1 { font-size: 1.5rem; margin-bottom: .5rem; overflow-wrap: anywhere; }
h2 { font-size: 1.1rem; margin: 2rem 0 .5rem; padding-bottom: .2rem; border-bottom: 1px solid #d1d9e0; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: .15rem 1rem; margin: 0; }
dl.facts dt { color: #59636e; } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
dd.bad, td.bad { color: #cf222e; font-weight: 600; } dd.ok, td.ok { color: #1a7f37; }
.alert { margin: 1rem 0; padding: .6rem .9rem; border: 1px solid; border-left-width: 5px; border-radius: 6px; }
.alert.bad { background: #ffebe9; border-color: #cf222e; color: #82071e; }
.alert.ok { background: #dafbe1; border-color: #1a7f37; color: #116329; }
.alert p { margin: 0; } .alert ul { margin: .3rem 0 0; padding-left: 1.3rem; } .alert strong { font-size: 1.05rem; }
table { border-collapse: collapse; margin: .3rem 0; }
th, td { border: 1px solid #d1d9e0; padding: .25rem .55rem; text-align: left; vertical-align: top;
         white-space: nowrap; }
td.wrap { white-space: normal; min-width: 20rem; overflow-wrap: anywhere; }
td.path, td.pair { white-space: normal; } td.pair span { white-space: nowrap; }
th { background: #f6f8fa; } th.group { text-align: center; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #ffebe9; }
li { overflow-wrap: anywhere; }
.none { color: #59636e; font-style: italic; }
/* A table wider than the page scrolls in its box; shadows at the edges say that there is more to see. */
.scroll { overflow-x: auto; max-width: 100%;
  background: linear-gradient(to right, #fff 30%, rgba(255,255,255,0)) left / 2rem 100%,
              linear-gradient(to left, #fff 30%, rgba(255,255,255,0)) right / 2rem 100%,
              radial-gradient(farthest-side at 0 50%, rgba(0,0,0,.22), rgba(0,0,0,0)) left / .8rem 100%,
              radial-gradient(farthest-side at 100% 50%, rgba(0,0,0,.22), rgba(0,0,0,0)) right / .8rem 100%;
  background-repeat: no-repeat; background-attachment: local, local, scroll, scroll; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem 3rem; margin-top: 1rem; }
.charts svg { max-width: 100%; height: auto; }
"""


def _html(doc: _Document) -> str:
    """The document as a page; its alerts stand out under the title, and a section's charts (inline SVG) go
    below its table."""
    e = _escape
    body = [f"<h1>{e(doc.title)}</h1>"]
    for alert in doc.alerts:
        items = "".join(f"<li>{e(detail)}</li>" for detail in alert.details)
        body.append(
            f'<div class="alert {"ok" if alert.ok else "bad"}" role="{"status" if alert.ok else "alert"}">'
            f"<p><strong>{e(alert.headline)}</strong></p>" + (f"<ul>{items}</ul>" if items else "") + "</div>"
        )
    body.append('<dl class="facts">')
    for fact in doc.facts:
        state = "" if fact.passed is None else f' class="{"ok" if fact.passed else "bad"}"'
        body.append(f"<dt>{e(fact.label)}</dt><dd{state}>{e(fact.value)}</dd>")
    body.append("</dl>")
    for section in doc.sections:
        body.append(f"<h2>{e(section.title)}</h2>")
        if section.items:
            body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in section.items) + "</ul>")
        elif section.table and section.table.rows:
            body.append(_html_table(section.table))
        else:
            body.append('<p class="none">none</p>')
        if section.charts:
            body.append(
                '<div class="charts">' + "".join(_bar_chart(chart) for chart in section.charts) + "</div>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(doc.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _column_groups(columns: list[_Column]) -> list[tuple[str, int]]:
    """Runs of columns that share a group as (group, length), every other column as ("", 1); empty when no
    column has a group. Two "Δ %" columns side by side only read right under a "params" / "FLOPs" group header.

    >>> _column_groups([_Column("stage"), *_delta_columns("params"), *_delta_columns("FLOPs")])
    [('', 1), ('params', 4), ('FLOPs', 4)]
    """
    groups: list[tuple[str, int]] = []
    for column in columns:
        if column.group and groups and groups[-1][0] == column.group:
            groups[-1] = (column.group, groups[-1][1] + 1)
        else:
            groups.append((column.group, 1))
    return groups if any(group for group, _ in groups) else []


def _path_chunks(path: str, short: int = 12) -> list[str]:
    """``path`` cut after dots into pieces of at least ``short`` characters, the places where a cell may break
    a long path: never after every dot, which would stack "model." "0." "m." one a line in a squeezed table.

    >>> _path_chunks("model.backbone.body.layer4.2.downsample.0")
    ['model.backbone.', 'body.layer4.', '2.downsample.0']
    >>> _path_chunks("backbone.fpn.layer_blocks.3"), _path_chunks("model.10")
    (['backbone.fpn.', 'layer_blocks.3'], ['model.10'])
    """
    chunks = [""]
    for part in path.split("."):
        if len(chunks[-1]) >= short:
            chunks.append("")
        chunks[-1] += part + "."
    chunks[-1] = chunks[-1][:-1]
    if len(chunks) > 1 and len(chunks[-1]) < short // 2:  # no lone "0" on the last line
        chunks[-2:] = [chunks[-2] + chunks[-1]]
    return chunks


def _html_table(table: _Table) -> str:
    e = _escape
    columns = table.columns

    def attr(name: str) -> str:
        return f' class="{name}"' if name else ""

    def cell(column: _Column, value: Any, failed: bool) -> str:
        if column.kind is _Kind.PATH:
            return '<td class="path">' + "<wbr>".join(e(chunk) for chunk in _path_chunks(value)) + "</td>"
        if column.kind is _Kind.REWRITE:
            before, after = value
            return f'<td class="pair"><span>{e(before)} →</span> <span>{e(after)}</span></td>'
        if column.kind is _Kind.VERDICT:
            return f"<td{attr('bad' if failed else 'ok')}>{e(value)}</td>"
        return f"<td{attr(_KIND_CLASSES.get(column.kind, ''))}>{e(value)}</td>"

    def header(column: _Column, text: str, extra: str = "") -> str:
        return f"<th{extra}{attr(_KIND_CLASSES.get(column.kind, ''))}>{e(text)}</th>"

    groups = _column_groups(columns)
    if groups:
        top, sub, i = [], [], 0
        for group, span in groups:
            if group:
                top.append(f'<th colspan="{span}" class="group">{e(group)}</th>')
                sub += [header(column, column.short) for column in columns[i : i + span]]
            else:
                top.append(header(columns[i], columns[i].header, ' rowspan="2"'))
            i += span
        head = f"<tr>{''.join(top)}</tr>\n<tr>{''.join(sub)}</tr>"
    else:
        head = "<tr>" + "".join(header(column, column.header) for column in columns) + "</tr>"
    rows = [
        ('<tr class="failed">' if r in table.failed_rows else "<tr>")
        + "".join(cell(column, value, r in table.failed_rows) for column, value in zip(columns, row))
        + "</tr>"
        for r, row in enumerate(table.rows)
    ]
    body = "\n".join(rows)
    # Wide tables (the sites have 12 columns) scroll inside their box instead of widening the page.
    return f'<div class="scroll"><table>\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


# The CSS class of a column's header and plain cells, by what the column holds.
_KIND_CLASSES = {_Kind.NUMBER: "num", _Kind.PROSE: "wrap", _Kind.PATH: "path"}


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


# Bar chart geometry, in SVG user units (pixels).
_LABEL_W, _LABEL_MAX_W, _BAR_W, _VALUE_W, _BAR_H, _GAP, _ROW_GAP, _TOP = 80, 200, 240, 150, 14, 3, 14, 46
_BEFORE_COLOR, _AFTER_COLOR, _GROWN_COLOR = "#afb8c1", "#0969da", "#cf222e"


def _bar_chart(chart: _Chart) -> str:
    """One hand-written SVG bar chart: one bar per stage, or before and after side by side."""
    e = _escape
    title, rows = chart.title, chart.rows
    compare = any(after is not None for _, _, after in rows)
    grew = any(after is not None and after > before for _, before, after in rows)
    bars_per_row = 2 if compare else 1
    row_h = bars_per_row * _BAR_H + (bars_per_row - 1) * _GAP + _ROW_GAP
    # Stage names are short, but a custom one must not run into the bars: the label column grows to fit
    # (about 7 px a character at 12 px) up to a limit, past which the name is cut and whole in a tooltip.
    longest = max([len(stage) for stage, _, _ in rows] or [0])
    label_w = min(max(_LABEL_W, 7 * longest + 12), _LABEL_MAX_W)
    top = _TOP if compare else _TOP - 18  # a profile's single bars need no legend row
    width, height = label_w + _BAR_W + _VALUE_W, top + max(len(rows), 1) * row_h
    scale = max([max(before, after or 0) for _, before, after in rows] or [1]) or 1

    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" font-size="12">',
        f"<title>{e(title)}</title>",
        f'<text x="0" y="14" font-weight="bold" font-size="13">{e(title)}</text>',
    ]
    if compare:
        legend = [("before", _BEFORE_COLOR), ("after", _AFTER_COLOR)]
        legend += [("after, grew", _GROWN_COLOR)] if grew else []
        for i, (label, color) in enumerate(legend):
            x = label_w + i * 80
            parts.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{color}"/>')
            parts.append(f'<text x="{x + 14}" y="33">{label}</text>')
    for r, (stage, before, after) in enumerate(rows):
        y = top + r * row_h
        name = stage if 7 * len(stage) + 12 <= label_w else stage[: (label_w - 12) // 7 - 1] + "…"
        tip = f"<title>{e(stage)}</title>" if name != stage else ""
        parts.append(f'<text x="0" y="{y + _BAR_H - 2}">{tip}{e(name)}</text>')
        bars = [(before, _BEFORE_COLOR if compare else _AFTER_COLOR, _si(before))]
        if compare and after is not None:
            change = 100.0 * (after - before) / before if before else 0.0
            color = _GROWN_COLOR if after > before else _AFTER_COLOR
            bars.append((after, color, f"{_si(after)} ({_percent(change)})"))
        for b, (value, color, text) in enumerate(bars):
            by = y + b * (_BAR_H + _GAP)
            w = round(_BAR_W * value / scale, 1)
            fill = f' fill="{_GROWN_COLOR}"' if color == _GROWN_COLOR else ""
            parts.append(f'<rect x="{label_w}" y="{by}" width="{w}" height="{_BAR_H}" fill="{color}"/>')
            parts.append(f'<text x="{label_w + w + 4}" y="{by + _BAR_H - 3}"{fill}>{e(text)}</text>')
    # The zero line the bars grow from: every bar in one chart shares it and one scale.
    parts.append(
        f'<line x1="{label_w - 0.5}" y1="{top - 4}" x2="{label_w - 0.5}" y2="{height - _ROW_GAP + 4}" '
        'stroke="#59636e" stroke-width="1"/>'
    )
    parts.append("</svg>")
    return "".join(parts)
