"""One function, many formats: a ``Plan`` (or a ``Profile``) as text, markdown, JSON or one HTML file.

Text and markdown are for people (thousands separators, readable ``46.56 M`` columns); JSON is for
machines (the versioned schema of ``docs/report-schema.md``); HTML is one self-contained file, no network
needed, that CI can upload as an artifact. CI gates ("at most 100 G FLOPs after the rewrite") are checked here
too, so that the report can say which gate missed and by how much::

    p = plan(model, "slim-neck", (torch.rand(1, 3, 640, 640),))
    gates = check_gates(p, max_flops=100_000_000_000, min_flops_reduction=10.0)
    print(render(p, "markdown", gates=gates))
    data = json.loads(render(p, "json", gates=gates))
    data["totals"]["flops"]["percent"], [g["passed"] for g in data["gates"]]
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

if TYPE_CHECKING:  # rendering needs only the fields, so the pipeline is not imported to print a report
    from rewrite.planner import Delta, Plan
    from rewrite.profiler import Profile

__all__ = ["FORMATS", "JSON_SCHEMA_VERSION", "GateResult", "check_gates", "render", "render_profile"]

# Bump on any change that can break a consumer (a key removed, renamed or changing meaning), not for new keys.
JSON_SCHEMA_VERSION = 1
FORMATS = ("text", "markdown", "json", "html")
_STAGE_ORDER = ("backbone", "neck", "head", "other")
# Free-text columns wrap at this width in the text format: one long fx error must not make a 300-column table.
_TEXT_WRAP = 60


# Gates


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
        amount = _gate_amount(abs(self.margin), self.unit)
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


def _gate_amount(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.2f} percentage points"
    return f"{value:,.0f} {unit}"


def _gate_value(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.2f}%"
    if unit == "rules":
        return f"{value:,.0f} rule" + ("" if value == 1 else "s")
    return f"{value:,.0f} ({_si(value)})"


# Entry points


def render(plan: Plan, fmt: str = "text", *, gates: Sequence[GateResult] = ()) -> str:
    """The plan as ``fmt`` ("text", "markdown", "json" or "html"); ends with a newline.

    ``gates`` (from ``check_gates``) adds a gates section, and the JSON key ``gates``.
    """
    _check_format(fmt)
    if fmt == "json":
        return _dump_json(_plan_json(plan, gates))
    doc = _plan_document(plan, gates)
    if fmt == "html":
        charts = _stage_charts(
            [(name, change.params.before, change.params.after) for name, change in _ordered(plan.stages)],
            [(name, change.flops.before, change.flops.after) for name, change in _ordered(plan.stages)],
        )
        return _html(doc, charts, _plan_alerts(plan, gates))
    return _markdown(doc) if fmt == "markdown" else _text(doc)


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
    doc = _profile_document(profile, blocks, model_name, input_shapes)
    if fmt == "html":
        charts = _stage_charts(
            [(name, c.params, None) for name, c in _ordered(profile.stages)],
            [(name, c.flops, None) for name, c in _ordered(profile.stages)],
        )
        return _html(doc, charts)
    return _markdown(doc) if fmt == "markdown" else _text(doc)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")


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
                "before": site.before,
                "after": site.after,
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


def _rounded(value: float) -> int | float:
    """Counts stay exact; percentages are rounded, so float noise never shows up in a diff of two reports."""
    return value if isinstance(value, int) else round(value, 4)


def _leaf_json(leaf: Any) -> dict[str, str]:
    return {"path": leaf.path, "type_name": leaf.type_name, "reason": leaf.reason}


def _dump_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# One document, three renderers (text, markdown, HTML)


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns
    wrap: set[int] = field(default_factory=set)  # free-text columns, wrapped in the text format
    failed_rows: set[int] = field(default_factory=set)  # highlighted in HTML (failed gates)


@dataclass
class _Section:
    title: str
    table: _Table | None = None  # None or no rows: the section says "none"
    items: list[str] = field(default_factory=list)  # a bullet list instead of a table


@dataclass
class _Document:
    title: str
    facts: list[tuple[str, str]]
    sections: list[_Section]


def _plan_document(plan: Plan, gates: Sequence[GateResult]) -> _Document:
    check = plan.shape_check
    facts = [
        (
            "result",
            plan.nothing_rewritten
            or f"{len(plan.sites)} site{'' if len(plan.sites) == 1 else 's'} rewritten",
        ),
        ("model", plan.model_name),
        ("rules", plan.rule_set),
        ("scope", plan.scope or "whole model"),
        ("input", _shapes(plan.input_shapes)),
        ("device", plan.device),
        (
            "shape check",
            ("passed" if check.passed else "FAILED") + (f": {check.detail}" if check.detail else ""),
        ),
    ]
    if gates:
        failed = [g.gate for g in gates if not g.passed]
        facts.append(("gates", f"FAILED: {', '.join(failed)}" if failed else f"all {len(gates)} passed"))

    totals = _Table(
        ["", "before", "after", "change", "change %", "readable"],
        [_total_row("params", plan.params), _total_row("FLOPs", plan.flops)],
        numeric={1, 2, 3, 4},
    )
    sections = [_Section("Totals", totals)]
    if gates:
        sections.append(
            _Section(
                "Gates",
                _Table(
                    ["gate", "threshold", "measured", "result", "detail"],
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
                    numeric={1, 2},
                    failed_rows={i for i, g in enumerate(gates) if not g.passed},
                ),
            )
        )

    stage_rows = [
        [name, *_delta_cells(c.params), *_delta_cells(c.flops)] for name, c in _ordered(plan.stages)
    ]
    stage_rows.append(["total", *_delta_cells(plan.params), *_delta_cells(plan.flops)])
    sections.append(
        _Section(
            "Stages",
            _Table(
                ["stage", *_delta_headers("params"), *_delta_headers("FLOPs")],
                stage_rows,
                numeric=set(range(1, 9)),
            ),
        )
    )
    sections.append(
        _Section(
            f"Rewritten sites ({len(plan.sites)})",
            _Table(
                ["path", "stage", "rule", "change", *_delta_headers("params"), *_delta_headers("FLOPs")],
                [
                    [
                        _path(s.path),
                        s.stage or "other",
                        s.rule,
                        f"{s.before} → {s.after}",
                        *_delta_cells(s.params),
                        *_delta_cells(s.flops),
                    ]
                    for s in plan.sites
                ],
                numeric=set(range(4, 12)),
            ),
        )
    )
    sections.append(
        _Section(
            f"Rejected candidates ({len(plan.rejected)})",
            _Table(
                ["path", "rule", "reason"],
                [[_path(r.path), r.rule, r.reason] for r in plan.rejected],
                wrap={2},
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
    return _Document(f"rewrite plan: {plan.model_name} with {plan.rule_set}", facts, sections)


def _profile_document(
    profile: Profile, blocks: list[tuple[str, Any]], model_name: str, input_shapes: Sequence[Sequence[int]]
) -> _Document:
    total = profile.total
    facts = [("model", model_name), ("input", _shapes(input_shapes)), ("device", profile.device)]

    def cost_cells(cost: Any) -> list[str]:
        share = 100.0 * cost.flops / total.flops if total.flops else 0.0
        return [f"{cost.params:,}", f"{cost.flops:,}", f"{cost.macs:,}", f"{share:.1f}%"]

    headers = ["params", "FLOPs", "MACs", "FLOPs share"]
    sections = [
        _Section(
            "Total",
            _Table(
                ["", "count", "readable"],
                [
                    ["params", f"{total.params:,}", _si(total.params)],
                    ["FLOPs", f"{total.flops:,}", _si(total.flops)],
                    ["MACs", f"{total.macs:,}", _si(total.macs)],
                ],
                numeric={1, 2},
            ),
        ),
        _Section(
            "Stages",
            _Table(
                ["stage", *headers],
                [[name, *cost_cells(c)] for name, c in _ordered(profile.stages)],
                numeric={1, 2, 3, 4},
            ),
        ),
        _Section(
            f"Top-level modules ({len(blocks)})",
            _Table(
                ["module", *headers], [[_path(p), *cost_cells(c)] for p, c in blocks], numeric={1, 2, 3, 4}
            ),
        ),
        _leaf_section(
            f"Needed real data, could not run on meta ({len(profile.needed_real_data)})",
            profile.needed_real_data,
        ),
    ]
    return _Document(f"rewrite profile: {model_name}", facts, sections)


def _leaf_section(title: str, leaves: Sequence[Any]) -> _Section:
    return _Section(
        title,
        _Table(
            ["path", "type", "reason"], [[_path(x.path), x.type_name, x.reason] for x in leaves], wrap={2}
        ),
    )


def _total_row(label: str, delta: Delta) -> list[str]:
    return [label, *_delta_cells(delta), f"{_si(delta.before)} → {_si(delta.after)}"]


def _delta_headers(what: str) -> list[str]:
    return [f"{what} before", f"{what} after", f"Δ {what}", "Δ %"]


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
    width = max(len(label) for label, _ in doc.facts)
    lines = [doc.title, ""] + [f"  {label:<{width}}  {value}" for label, value in doc.facts]
    for section in doc.sections:
        lines += ["", section.title, "-" * len(section.title)]
        if section.items:
            lines += [f"- {item}" for item in section.items]
        elif section.table and section.table.rows:
            table = section.table
            lines.append(
                tabulate(
                    table.rows,
                    table.headers,
                    tablefmt="simple",
                    disable_numparse=True,  # "model.10" or "0" stay text; our numbers are already formatted
                    colalign=_colalign(table),
                    maxcolwidths=[_TEXT_WRAP if i in table.wrap else None for i in range(len(table.headers))],
                )
            )
        else:
            lines.append("none")
    return "\n".join(lines) + "\n"


def _colalign(table: _Table) -> list[str]:
    return ["right" if i in table.numeric else "left" for i in range(len(table.headers))]


# Markdown


def _markdown(doc: _Document) -> str:
    lines = [f"## {_md(doc.title)}", ""] + [f"- **{label}:** {_md(value)}" for label, value in doc.facts]
    for section in doc.sections:
        lines += ["", f"### {_md(section.title)}", ""]
        if section.items:
            lines += [f"- {_md(item)}" for item in section.items]
        elif section.table and section.table.rows:
            table = section.table
            lines.append(
                tabulate(
                    [[_md(cell) for cell in row] for row in table.rows],
                    [_md(h) for h in table.headers],
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


def _plan_alerts(plan: Plan, gates: Sequence[GateResult]) -> list[tuple[bool, str, list[str]]]:
    """What a reader must see first, as (ok, headline, details): failed gates, a failed shape check, or
    that every gate passed."""
    alerts = []
    failed = [g for g in gates if not g.passed]
    if failed:
        alerts.append(
            (
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
            (False, "Shape check failed", [plan.shape_check.detail] if plan.shape_check.detail else [])
        )
    if gates and not failed:
        alerts.append((True, f"All {len(gates)} gate{'' if len(gates) == 1 else 's'} passed", []))
    return alerts


def _html(doc: _Document, charts: str, alerts: Sequence[tuple[bool, str, list[str]]] = ()) -> str:
    """The document as a page; ``alerts`` (failed gates …) stand out under the title, and ``charts`` (inline
    SVG) go below the per-stage table they draw."""
    e = _escape
    body = [f"<h1>{e(doc.title)}</h1>"]
    for ok, headline, details in alerts:
        items = "".join(f"<li>{e(d)}</li>" for d in details)
        body.append(
            f'<div class="alert {"ok" if ok else "bad"}" role="{"status" if ok else "alert"}">'
            f"<p><strong>{e(headline)}</strong></p>" + (f"<ul>{items}</ul>" if items else "") + "</div>"
        )
    body.append('<dl class="facts">')
    for label, value in doc.facts:
        state = _fact_state(value) if label in ("shape check", "gates") else ""
        body.append(f"<dt>{e(label)}</dt><dd{state}>{e(value)}</dd>")
    body.append("</dl>")
    for section in doc.sections:
        body.append(f"<h2>{e(section.title)}</h2>")
        if section.items:
            body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in section.items) + "</ul>")
        elif section.table and section.table.rows:
            body.append(_html_table(section.table))
        else:
            body.append('<p class="none">none</p>')
        if section.title == "Stages":
            body.append(charts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{e(doc.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _fact_state(value: str) -> str:
    if value.startswith("FAILED"):
        return ' class="bad"'
    return ' class="ok"' if value.startswith(("passed", "all ")) else ""


# Columns whose cells are module paths: they may break after a dot rather than widen the table.
_PATH_HEADERS = ("path", "module")
_SUB_HEADERS = ("before", "after", "Δ", "Δ %")


def _column_groups(headers: list[str]) -> list[tuple[str, int]]:
    """Runs of ``_delta_headers(what)`` as (what, 4), every other column as ("", 1); empty when there are no
    runs. Two "Δ %" columns side by side only read right under a "params" / "FLOPs" group header.

    >>> _column_groups(["stage", *_delta_headers("params"), *_delta_headers("FLOPs")])
    [('', 1), ('params', 4), ('FLOPs', 4)]
    """
    groups, i = [], 0
    while i < len(headers):
        what = next((w for w in ("params", "FLOPs") if headers[i : i + 4] == _delta_headers(w)), None)
        groups.append((what, 4) if what else ("", 1))
        i += 4 if what else 1
    return groups if any(what for what, _ in groups) else []


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

    def cls(i: int) -> str:
        if i in table.numeric:
            return "num"
        if i in table.wrap:
            return "wrap"
        return "path" if table.headers[i] in _PATH_HEADERS else ""

    def attr(name: str) -> str:
        return f' class="{name}"' if name else ""

    def cell(i: int, value: str, failed: bool) -> str:
        name, text = cls(i), e(value)
        if name == "path":
            text = "<wbr>".join(e(chunk) for chunk in _path_chunks(value))
        elif not name and " → " in value:  # "Conv(…) → GSConv(…)" breaks at the arrow, never inside a side
            before, _, after = value.partition(" → ")
            name, text = "pair", f"<span>{e(before)} →</span> <span>{e(after)}</span>"
        elif table.headers[i] == "result" and value in ("pass", "FAIL"):
            name = "bad" if failed else "ok"
        return f"<td{attr(name)}>{text}</td>"

    groups = _column_groups(table.headers)
    if groups:
        top, sub, i = [], [], 0
        for what, span in groups:
            if what:
                top.append(f'<th colspan="{span}" class="group">{e(what)}</th>')
                sub += [f"<th{attr(cls(i + k))}>{e(h)}</th>" for k, h in enumerate(_SUB_HEADERS)]
            else:
                top.append(f'<th rowspan="2"{attr(cls(i))}>{e(table.headers[i])}</th>')
            i += span
        head = f"<tr>{''.join(top)}</tr>\n<tr>{''.join(sub)}</tr>"
    else:
        head = (
            "<tr>" + "".join(f"<th{attr(cls(i))}>{e(h)}</th>" for i, h in enumerate(table.headers)) + "</tr>"
        )
    rows = [
        ('<tr class="failed">' if r in table.failed_rows else "<tr>")
        + "".join(cell(i, value, r in table.failed_rows) for i, value in enumerate(row))
        + "</tr>"
        for r, row in enumerate(table.rows)
    ]
    body = "\n".join(rows)
    # Wide tables (the sites have 12 columns) scroll inside their box instead of widening the page.
    return f'<div class="scroll"><table>\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


# Bar chart geometry, in SVG user units (pixels).
_LABEL_W, _LABEL_MAX_W, _BAR_W, _VALUE_W, _BAR_H, _GAP, _ROW_GAP, _TOP = 80, 200, 240, 150, 14, 3, 14, 46
_BEFORE_COLOR, _AFTER_COLOR, _GROWN_COLOR = "#afb8c1", "#0969da", "#cf222e"


def _stage_charts(params: list[tuple[str, int, int | None]], flops: list[tuple[str, int, int | None]]) -> str:
    """Two hand-written SVG bar charts (params, FLOPs) per stage; a plan's rows carry (stage, before, after),
    a profile's (stage, value, None)."""
    # A stage with nothing in it (often "other") would only be an empty row; both charts keep the same rows.
    shown = {stage for stage, before, after in params + flops if before or after}
    params, flops = ([row for row in rows if row[0] in shown] for rows in (params, flops))
    charts = _bar_chart("params per stage", params) + _bar_chart("FLOPs per stage", flops)
    return f'<div class="charts">{charts}</div>'


def _bar_chart(title: str, rows: list[tuple[str, int, int | None]]) -> str:
    e = _escape
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
