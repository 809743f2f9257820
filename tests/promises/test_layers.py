"""The library's layers: imports run one way, down the pipeline, as docs/design.md draws and lists them.

A unit is a module of ``rewrite/`` or one of its packages (``report/``, ``cli/``, ...); ``rewrite/__init__.py``
and ``__main__.py`` gather the public names and are no unit. Every import counts: at the top, inside a
function, or for type checkers only.
"""

import ast
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "rewrite"
DESIGN = ROOT / "docs" / "design.md"


def unit(module: str) -> str | None:
    """The unit a dotted module name belongs to: ``rewrite.report.html`` is ``report/``, ``rewrite.fold``
    ``fold.py``; ``None`` outside the library's units (and for a name that is no module, like an attribute)."""
    parts = module.split(".")
    if parts[0] != "rewrite" or len(parts) < 2:
        return None
    if (LIBRARY / parts[1]).is_dir():
        return parts[1] + "/"
    return parts[1] + ".py" if (LIBRARY / f"{parts[1]}.py").is_file() and parts[1] != "__main__" else None


def dotted(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import statement of ``path`` reaches, relative imports resolved."""
    module = dotted(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for statement in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(statement, ast.Import):
            names |= {alias.name for alias in statement.names}
        elif isinstance(statement, ast.ImportFrom):
            base = statement.module or ""
            if statement.level:
                anchor = package.rsplit(".", statement.level - 1)[0]
                base = f"{anchor}.{base}".rstrip(".")
            names |= {base} | {f"{base}.{alias.name}" for alias in statement.names}
    return names


def import_graph() -> nx.DiGraph:
    """An edge ``a → b`` when unit ``a`` imports from unit ``b``."""
    graph = nx.DiGraph()
    for path in sorted(LIBRARY.rglob("*.py")):
        source = unit(dotted(path))
        if source is None:
            continue
        graph.add_node(source)
        for name in imported_names(path):
            target = unit(name)
            if target not in (None, source):
                graph.add_edge(source, target)
    return graph


def listed_units() -> list[str]:
    """The units in the order of docs/design.md's module table (its first column)."""
    rows = re.findall(r"^\| `([^`]+)` \|", DESIGN.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return [row.split("/")[0] + "/" if "/" in row else row for row in rows]


def drawing(graph: nx.DiGraph) -> str:
    """The mermaid flowchart of docs/design.md: each unit above the units that import it, with only the edges
    that no longer path implies (the transitive reduction), so that the pipeline reads top to bottom."""
    reduced = nx.transitive_reduction(graph)
    ids = {name: re.sub(r"\W", "_", name) for name in graph}
    lines = ["flowchart TD"]
    lines += [f'  {ids[name]}["{name}"]' for name in sorted(graph)]
    lines += [f"  {ids[used]} --> {ids[user]}" for user, used in sorted(reduced.edges)]
    return "\n".join(lines)


def drawn() -> str:
    found = re.search(r"```mermaid\n(.*?)\n```", DESIGN.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert found, "docs/design.md has no mermaid drawing of the layers"
    return found[1]


def test_imports_never_run_back_up():
    graph = import_graph()
    assert nx.is_directed_acyclic_graph(graph), f"import cycle: {nx.find_cycle(graph)}"


def test_the_module_table_lists_every_unit_once_below_what_it_imports():
    graph, order = import_graph(), listed_units()
    assert sorted(order) == sorted(graph), "docs/design.md's module table and rewrite/ list other units"
    position = {name: index for index, name in enumerate(order)}
    upward = [(user, used) for user, used in graph.edges if position[used] > position[user]]
    assert not upward, f"listed above a unit they import (user, used): {upward}"


def test_the_drawing_is_the_code_s():
    expected = drawing(import_graph())
    assert drawn() == expected, f"redraw docs/design.md's layers as:\n```mermaid\n{expected}\n```"
