"""The one document every format of a report is drawn from, and how its figures read.

A :class:`Document` holds facts and sections; a section's table holds rows of raw figures (its JSON records)
and declares per column what the column holds and how a person reads it, so the JSON is the rows' data and
the text, markdown and HTML are their cells: no renderer recognises a section by its title or takes a cell's
text apart again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# Stages in pipeline order; any others follow by name.
STAGE_ORDER = ("backbone", "neck", "head", "other")


class Kind(Enum):
    """What a column holds, which decides how each format shows it."""

    TEXT = "text"
    NUMBER = "number"  # already formatted; right-aligned
    PROSE = "prose"  # free text (an fx error …): wrapped in the text format and in HTML
    PATH = "path"  # a module path: HTML may break it after a dot
    REWRITE = "rewrite"  # a (before, after) pair, "before → after"; HTML breaks it at the arrow only
    VERDICT = "verdict"  # "pass" or "FAIL", coloured in HTML by the row's state


@dataclass(frozen=True)
class Row:
    """One row of a table: its raw figures, what the JSON holds for it."""

    data: Any
    key: str | None = None  # its name where the table is a JSON object (a stage's name, "flops"); else None
    label: str = ""  # how people name the row, where a column shows that ("FLOPs", "total")
    failed: bool = False  # highlighted in HTML (a failed gate)


@dataclass(frozen=True)
class Column:
    header: str
    kind: Kind = Kind.TEXT
    # HTML groups a run of columns under one header ("params"), and titles each by ``short`` ("Δ %") beneath it.
    group: str = ""
    short: str = ""
    # The cell people read in a row: a string, or a (before, after) pair of strings for a REWRITE column.
    cell: Callable[[Row], Any] = lambda row: row.label


@dataclass
class Table:
    """Rows of figures and the columns people read them by; the rows' data is the JSON, an object when the rows
    have keys, else an array. ``footer`` rows are for people only (a stages table's total)."""

    columns: list[Column]
    rows: list[Row]
    footer: list[Row] = field(default_factory=list)

    @property
    def shown(self) -> list[Row]:
        return self.rows + self.footer

    def cells(self) -> list[list[Any]]:
        return [[column.cell(row) for column in self.columns] for row in self.shown]

    def data(self) -> dict[str, Any] | list[Any]:
        if any(row.key is not None for row in self.rows):
            return {row.key: row.data for row in self.rows}
        return [row.data for row in self.rows]


@dataclass(frozen=True)
class Chart:
    """Bars per stage: ``(stage, before, after)`` rows, ``after`` None where there is one state (a profile)."""

    title: str
    rows: list[tuple[str, int, int | None]]


@dataclass
class Section:
    title: str
    table: Table | None = None  # None or no rows: the section says "none"
    items: list[str] = field(default_factory=list)  # a bullet list instead of a table
    charts: list[Chart] = field(default_factory=list)  # drawn under the table in HTML only
    key: str | None = None  # its key in the JSON; None for a section people alone read

    def data(self) -> Any:
        return self.table.data() if self.table is not None else list(self.items)


@dataclass(frozen=True)
class Fact:
    label: str
    value: str  # as people read it
    passed: bool | None = None  # a verdict (the shape check, the gates), coloured in HTML
    key: str | None = None  # its key in the JSON, with ``data`` as its value; None for people only
    data: Any = None


@dataclass(frozen=True)
class Alert:
    """What a reader must see first, under the title in HTML: failed gates, a failed shape check."""

    ok: bool
    headline: str
    details: list[str] = field(default_factory=list)


@dataclass
class Document:
    title: str
    facts: list[Fact]
    sections: list[Section]
    alerts: list[Alert] = field(default_factory=list)
    report: str = ""  # the JSON's "report": "plan", "profile"; empty for a document that has no JSON form
    # The JSON's keys in the schema's order (docs/report-schema.md); empty: the facts', then the sections'.
    json_order: tuple[str, ...] = ()


# How figures read


def ordered(stages: dict[str, Any]) -> list[tuple[str, Any]]:
    """Stages in pipeline order (backbone, neck, head, other), then any others by name."""
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    return sorted(stages.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def si(value: float) -> str:
    """A count with an SI suffix, for reading at a glance.

    >>> si(46_563_709), si(108_993_740_800), si(-6_604_928), si(512)
    ('46.56 M', '108.99 G', '-6.60 M', '512')
    """
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:g}"


def signed(value: int) -> str:
    return f"{value:+,}" if value else "0"


def percent(value: float) -> str:
    return f"{value:+.2f}%" if value else "0.00%"


def shapes(input_shapes: Iterable[Sequence[int]]) -> str:
    return ", ".join("×".join(str(d) for d in shape) for shape in input_shapes) or "none"


def path(module_path: str) -> str:
    return module_path or "(root)"
