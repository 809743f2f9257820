"""A report as plain text: tables with thousands separators and ``46.56 M`` columns, for a terminal or a log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tabulate import tabulate

from rewrite.report.document import Document, Kind, Section, Table

# Free-text columns wrap at this width: one long fx error must not make a 300-column table.
_WRAP = 60


def render_text(doc: Document) -> str:
    width = max(len(fact.label) for fact in doc.facts)
    lines = [doc.title, ""] + [f"  {fact.label:<{width}}  {fact.value}" for fact in doc.facts]
    for section in doc.sections:
        lines += ["", section.title, "-" * len(section.title)]
        lines += section_lines(section, _table, none="none")
    return "\n".join(lines) + "\n"


def _table(table: Table) -> str:
    return tabulate(
        plain_cells(table),
        [column.header for column in table.columns],
        tablefmt="simple",
        disable_numparse=True,  # "model.10" or "0" stay text; our numbers are already formatted
        colalign=alignments(table),
        maxcolwidths=[_WRAP if column.kind is Kind.PROSE else None for column in table.columns],
    )


def section_lines(
    section: Section, table: Callable[[Table], str], *, none: str, item: Callable[[str], str] = str
) -> list[str]:
    """What the text and markdown reports write under a section's title: its items as a list (each written by
    ``item``), else its table (written by ``table``) when it has rows, else ``none``."""
    if section.items:
        return [f"- {item(text)}" for text in section.items]
    if section.table and section.table.rows:
        return [table(section.table)]
    return [none]


def plain_cells(table: Table) -> list[list[Any]]:
    """The cells as plain text, for the text and markdown tables: a rewrite reads "before → after"."""
    return [
        [
            " → ".join(cell) if column.kind is Kind.REWRITE else cell
            for column, cell in zip(table.columns, row)
        ]
        for row in table.cells()
    ]


def alignments(table: Table) -> list[str]:
    return ["right" if column.kind is Kind.NUMBER else "left" for column in table.columns]
