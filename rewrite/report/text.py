"""A report as plain text: tables with thousands separators and ``46.56 M`` columns, for a terminal or a log."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from rewrite.report.document import Document, Kind, Table

# Free-text columns wrap at this width: one long fx error must not make a 300-column table.
_WRAP = 60


def render_text(doc: Document) -> str:
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
                    plain_cells(table),
                    [column.header for column in table.columns],
                    tablefmt="simple",
                    disable_numparse=True,  # "model.10" or "0" stay text; our numbers are already formatted
                    colalign=alignments(table),
                    maxcolwidths=[_WRAP if column.kind is Kind.PROSE else None for column in table.columns],
                )
            )
        else:
            lines.append("none")
    return "\n".join(lines) + "\n"


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
