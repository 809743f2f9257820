"""A report as one self-contained HTML page: no network needed, for CI to upload as an artifact. Alerts stand
out under the title, and a section's charts (inline SVG bars) go below its table."""

from __future__ import annotations

import html
from typing import Any

from rewrite.report.document import Chart, Column, Document, Kind, Table, percent, si

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


def render_html(doc: Document) -> str:
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
            body.append(_table(section.table))
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


def _column_groups(columns: list[Column]) -> list[tuple[str, int]]:
    """Runs of columns that share a group as (group, length), every other column as ("", 1); empty when no
    column has a group. Two "Δ %" columns side by side only read right under a "params" / "FLOPs" group header.

    >>> _column_groups([Column("stage"), Column("params before", group="params"), Column("Δ %", group="params")])
    [('', 1), ('params', 2)]
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


def _table(table: Table) -> str:
    e = _escape
    columns = table.columns

    def attr(name: str) -> str:
        return f' class="{name}"' if name else ""

    def cell(column: Column, value: Any, failed: bool) -> str:
        if column.kind is Kind.PATH:
            return '<td class="path">' + "<wbr>".join(e(chunk) for chunk in _path_chunks(value)) + "</td>"
        if column.kind is Kind.REWRITE:
            before, after = value
            return f'<td class="pair"><span>{e(before)} →</span> <span>{e(after)}</span></td>'
        if column.kind is Kind.VERDICT:
            return f"<td{attr('bad' if failed else 'ok')}>{e(value)}</td>"
        return f"<td{attr(_KIND_CLASSES.get(column.kind, ''))}>{e(value)}</td>"

    def header(column: Column, text: str, extra: str = "") -> str:
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
        ('<tr class="failed">' if row.failed else "<tr>")
        + "".join(cell(column, value, row.failed) for column, value in zip(columns, cells))
        + "</tr>"
        for row, cells in zip(table.shown, table.cells())
    ]
    body = "\n".join(rows)
    # Wide tables (the sites have 12 columns) scroll inside their box instead of widening the page.
    return f'<div class="scroll"><table>\n<thead>{head}</thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


# The CSS class of a column's header and plain cells, by what the column holds.
_KIND_CLASSES = {Kind.NUMBER: "num", Kind.PROSE: "wrap", Kind.PATH: "path"}


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


# Bar chart geometry, in SVG user units (pixels).
_LABEL_W, _LABEL_MAX_W, _BAR_W, _VALUE_W, _BAR_H, _GAP, _ROW_GAP, _TOP = 80, 200, 240, 150, 14, 3, 14, 46
_BEFORE_COLOR, _AFTER_COLOR, _GROWN_COLOR = "#afb8c1", "#0969da", "#cf222e"


def _bar_chart(chart: Chart) -> str:
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
        bars = [(before, _BEFORE_COLOR if compare else _AFTER_COLOR, si(before))]
        if compare and after is not None:
            change = 100.0 * (after - before) / before if before else 0.0
            color = _GROWN_COLOR if after > before else _AFTER_COLOR
            bars.append((after, color, f"{si(after)} ({percent(change)})"))
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
