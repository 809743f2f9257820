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

Every format is drawn from one document (:mod:`rewrite.report.document`, filled in by
:mod:`rewrite.report.reports`): sections whose tables hold the figures, as the JSON has them, and say how
people read each column (a number, a module path, a rewrite's before and after …), with the charts that go
with them. One module renders each format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

# Gate policy lives in rewrite.gates; both names stay importable from here, where they used to live.
from rewrite.gates import GateResult, check_gates
from rewrite.report.document import Document
from rewrite.report.html import render_html
from rewrite.report.json import JSON_SCHEMA_VERSION, render_json
from rewrite.report.markdown import render_markdown
from rewrite.report.reports import comparison_document, plan_document, profile_document
from rewrite.report.text import render_text

if TYPE_CHECKING:
    from rewrite.planner import Plan
    from rewrite.profiler import Profile
    from rewrite.report.comparison import Comparison

__all__ = [
    "FORMATS",
    "JSON_SCHEMA_VERSION",
    "GateResult",
    "check_gates",
    "render",
    "render_comparison",
    "render_profile",
]

_RENDERERS: dict[str, Callable[[Document], str]] = {
    "text": render_text,
    "markdown": render_markdown,
    "json": render_json,
    "html": render_html,
}
FORMATS = tuple(_RENDERERS)


def render(
    plan: Plan,
    fmt: str = "text",
    *,
    gates: Sequence[GateResult] = (),
    gate_label: Callable[[str], str] | None = None,
) -> str:
    """The plan as ``fmt`` ("text", "markdown", "json" or "html"); ends with a newline.

    ``gates`` (from ``check_gates``) adds a gates section, and the JSON key ``gates``. People's formats name a
    gate by ``gate_label(gate.gate)``, by default its name itself (``max-flops``); the ``rewrite`` command
    names its option (``--max-flops``). The JSON always holds the name.
    """
    _check_format(fmt)
    return _RENDERERS[fmt](plan_document(plan, gates, gate_label or str))


def render_profile(
    profile: Profile, fmt: str = "text", *, model_name: str, input_shapes: Sequence[Sequence[int]]
) -> str:
    """A profile (params / FLOPs / MACs per stage, per top-level block and in total) as ``fmt``.

    ``profile`` does not know what it measured, so the model's name and the input shapes are passed in.
    """
    _check_format(fmt)
    return _RENDERERS[fmt](profile_document(profile, model_name, input_shapes))


def render_comparison(comparison: Comparison, fmt: str = "text") -> str:
    """Two detectors side by side (params, FLOPs, latency, mAP50, mAP50-95, as
    :func:`rewrite.integrations.ultralytics.compare` measured them) as ``fmt``: "text", "markdown" or "html"."""
    _check_format(fmt)
    if fmt == "json":
        raise ValueError("a comparison renders as text, markdown or html")
    return _RENDERERS[fmt](comparison_document(comparison))


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")
