"""Module-path arithmetic, in one place: ``"model.24.m.0"`` names a module by the attribute names leading to it
from the model root, and ``""`` is the root itself.

Every stage names modules this way (the tracer's node facts, stage prefixes, scopes, the rewriter's new
attribute names); nothing else in ``rewrite`` splits a path on its dots.

>>> join_path("model.24", "m.0"), split_path("model.24.m"), relative_path("model.24.m", "model.24")
('model.24.m.0', ('model.24', 'm'), 'm')
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "attribute_at",
    "has_attribute",
    "join_path",
    "parent_path",
    "path_and_ancestors",
    "relative_path",
    "split_path",
]


def join_path(*parts: str) -> str:
    """The module path of ``parts`` (paths or names) one inside the other; empty parts are the root.

    >>> join_path("model", "24", "m.0"), join_path("", "head"), join_path("", "")
    ('model.24.m.0', 'head', '')
    """
    return ".".join(part for part in parts if part)


def split_path(path: str) -> tuple[str, str]:
    """The path of the module holding ``path``, and the name it holds it under (the root: ``("", "")``).

    >>> split_path("model.24.m"), split_path("head"), split_path("")
    (('model.24', 'm'), ('', 'head'), ('', ''))
    """
    parent, _, name = path.rpartition(".")
    return parent, name


def parent_path(path: str) -> str:
    """The path of the module holding ``path`` (the root for a child of the root, and for the root itself).

    >>> parent_path("model.24.m"), parent_path("head"), parent_path("")
    ('model.24', '', '')
    """
    return split_path(path)[0]


def path_and_ancestors(path: str) -> Iterator[str]:
    """``path`` itself, then each enclosing module path, nearest first, ending with the root ``""``.

    >>> list(path_and_ancestors("model.24.m")), list(path_and_ancestors(""))
    (['model.24.m', 'model.24', 'model', ''], [''])
    """
    while path:
        yield path
        path = parent_path(path)
    yield ""


def relative_path(path: str, ancestor: str) -> str:
    """``path`` relative to the module at ``ancestor`` (``""`` when it is not inside it).

    >>> relative_path("model.10.act", "model.10"), relative_path("model.10", ""), relative_path("head", "model")
    ('act', 'model.10', '')
    """
    if not ancestor:
        return path
    return path[len(ancestor) + 1 :] if path.startswith(ancestor + ".") else ""


def attribute_at(owner: object, path: str) -> object:
    """The attribute that ``path`` names, reached from ``owner`` name by name (``AttributeError`` when missing).

    >>> from torch import nn
    >>> attribute_at(nn.Sequential(nn.Conv2d(1, 2, 1)), "0.weight").shape
    torch.Size([2, 1, 1, 1])
    """
    value = owner
    for name in path.split("."):
        value = getattr(value, name)
    return value


def has_attribute(owner: object, path: str) -> bool:
    """Whether ``path`` names an attribute of ``owner`` (a free name for a new module is one it does not).

    >>> from torch import nn
    >>> has_attribute(nn.Sequential(nn.ReLU()), "0"), has_attribute(nn.Sequential(nn.ReLU()), "0.weight")
    (True, False)
    """
    try:
        attribute_at(owner, path)
    except AttributeError:
        return False
    return True
