"""A page of HTML as a tree, for checking a report by its structure (which element holds what, with which class)
rather than by its spelling (attribute order, whitespace, inline styles)."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Element:
    """One HTML (or inline SVG) element of a parsed page: what a browser would see, not how it is spelled."""

    tag: str
    attrs: dict[str, str | None]
    children: list[Element | str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def elements(self) -> list[Element]:
        return [child for child in self.children if isinstance(child, Element)]

    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text() for child in self.children)

    def own_text(self) -> str:
        """The text outside child elements (an SVG label without its tooltip ``<title>``)."""
        return "".join(child for child in self.children if isinstance(child, str))

    def find_all(self, tag: str, *classes: str) -> list[Element]:
        """Every element below this one with ``tag`` and all of ``classes``, in document order."""
        found = []
        for child in self.elements():
            if child.tag == tag and set(classes) <= child.classes:
                found.append(child)
            found += child.find_all(tag, *classes)
        return found

    def find(self, tag: str, *classes: str) -> Element:
        return self.find_all(tag, *classes)[0]


# Elements that have no closing tag.
VOID_ELEMENTS = frozenset({"meta", "wbr", "br", "img", "input", "link", "hr", "col", "source"})


class TreeBuilder(HTMLParser):
    """Parses a page into :class:`Element` s."""

    def __init__(self):
        super().__init__()
        self.root = Element("#document", {})
        self.open = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, dict(attrs))
        self.open[-1].children.append(element)
        if tag not in VOID_ELEMENTS:
            self.open.append(element)

    def handle_startendtag(self, tag, attrs):  # <rect …/> in SVG
        self.open[-1].children.append(Element(tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag not in VOID_ELEMENTS:
            assert self.open[-1].tag == tag, f"</{tag}> closes <{self.open[-1].tag}>"
            self.open.pop()

    def handle_data(self, data):
        self.open[-1].children.append(data)


def parse_html(page: str) -> Element:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    assert builder.open == [builder.root], "unclosed elements"
    return builder.root
