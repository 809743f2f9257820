"""A report as GitHub-flavoured markdown: for a pull request comment or a CI job's step summary."""

from __future__ import annotations

import html

from tabulate import tabulate

from rewrite.report.document import Document, Table
from rewrite.report.text import alignments, plain_cells, section_lines


def render_markdown(doc: Document) -> str:
    lines = [f"## {_md(doc.title)}", ""] + [f"- **{fact.label}:** {_md(fact.value)}" for fact in doc.facts]
    for section in doc.sections:
        lines += ["", f"### {_md(section.title)}", ""]
        lines += section_lines(section, _table, none="_none_", item=_md)
    return "\n".join(lines) + "\n"


def _table(table: Table) -> str:
    return tabulate(
        [[_md(cell) for cell in row] for row in plain_cells(table)],
        [_md(column.header) for column in table.columns],
        tablefmt="pipe",  # GitHub's pipe table, with the ":" alignment markers GitHub honours
        disable_numparse=True,
        colalign=alignments(table),
    )


_MD_SPECIALS = str.maketrans({c: f"\\{c}" for c in "\\`*_[]|#"})


def _md(value: str) -> str:
    """Text for a markdown line or table cell: GitHub renders inline HTML and markdown, and an fx error
    message such as ``expected <class 'Tensor'>`` would otherwise vanish as a tag.

    >>> _md("a|b <x> *y*")
    'a\\\\|b &lt;x&gt; \\\\*y\\\\*'
    """
    return html.escape(" ".join(str(value).split()), quote=False).translate(_MD_SPECIALS)
