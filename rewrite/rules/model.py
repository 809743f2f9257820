"""What a rule is: the frozen dataclasses a rule file becomes, and what they do with a site's facts.

:mod:`rewrite.rules.parse` builds them from TOML, checking every key and value on the way; the matcher
(:mod:`rewrite.match`) and the planner read them. Built in Python they need no file:

>>> rule = Rule("conv", Pattern(chain=(ChainStep("Conv2d"), ChainStep("activation", True))), Replace("GSConv"))
>>> [step.name for step in RuleSet("demo", (rule,)).rules[0].match.chain]
['Conv2d', 'activation']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from rewrite.site import Site
from rewrite.vocabulary import CATEGORIES, node_in_category


@dataclass(frozen=True)
class ChainStep:
    """One step of ``match.chain``: a module class name (``"BatchNorm2d"``) or a category (``"activation"``).

    A category step accepts what :mod:`rewrite.vocabulary` puts in that category (modules by class hierarchy,
    functions, tensor methods); a class step accepts calls of modules of exactly that class.

    >>> import torch
    >>> step = ChainStep("activation", optional=True)
    >>> step.accepts("call_module", "model.0.act", nn.SiLU()), step.accepts("call_function", torch.relu, None)
    (True, True)
    >>> ChainStep("Conv2d").accepts("call_module", "model.0.conv", nn.Conv2d(3, 8, 3))
    True
    """

    name: str  # a category when lower-case (conv, norm, activation), else a class name
    optional: bool = False

    def accepts(self, op: str, target: object, module: nn.Module | None) -> bool:
        """Whether an fx node (its ``op``, its ``target``, the module a ``call_module`` calls) fits."""
        if self.name in CATEGORIES:
            return node_in_category(self.name, op, target, module)
        return op == "call_module" and type(module).__name__ == self.name


@dataclass(frozen=True)
class Pattern:
    """A rule's ``match``: module classes by name, or an op chain; never both (the other one is empty)."""

    module: tuple[str, ...] = ()
    chain: tuple[ChainStep, ...] = ()
    not_inside: tuple[str, ...] = ()  # skip candidates inside a module of one of these classes


@dataclass(frozen=True)
class Predicate:
    """One ``where`` test of a site fact: ``kind`` is ``eq``, ``one_of``, ``range`` or ``multiple_of``.

    Arrays are tuples; ``range`` is ``(lo, hi)``, inclusive. On a non-square spatial fact such as a
    ``(3, 1)`` kernel, ``range`` and ``multiple_of`` must hold for every dimension.

    >>> Predicate("kernel_size", "one_of", (1, 3)).check(5)
    'kernel_size 5 is not one of [1, 3]'
    >>> Predicate("stride", "range", (1, 2)).check(2) is None
    True
    >>> Predicate("kernel_size", "eq", 3).check(None, "C3")
    'kernel_size unknown for C3'
    """

    key: str
    kind: Literal["eq", "one_of", "range", "multiple_of"]
    value: Any

    def check(self, actual: Any, module_type: str | None = None) -> str | None:
        """``None`` when ``actual`` satisfies the test, else a short reason; ``module_type`` names the site
        in the reason when the fact is unknown (``None``)."""
        if actual is None:
            return f"{self.key} unknown for {module_type}" if module_type else f"{self.key} unknown"
        if self.kind == "eq":
            satisfied, wanted = _same(actual, self.value), f"is not {as_toml(self.value)}"
        elif self.kind == "one_of":
            satisfied = any(_same(actual, option) for option in self.value)
            wanted = f"is not one of {as_toml(self.value)}"
        elif self.kind == "range":
            low, high = self.value
            numbers = _numbers(actual)
            satisfied = numbers is not None and all(low <= number <= high for number in numbers)
            wanted = f"is not in range {as_toml(self.value)}"
        else:
            numbers = _numbers(actual)
            satisfied = numbers is not None and all(
                isinstance(number, int) and number % self.value == 0 for number in numbers
            )
            wanted = f"is not a multiple of {self.value}"
        return None if satisfied else f"{self.key} {as_toml(actual)} {wanted}"


@dataclass(frozen=True)
class Derivation:
    """An option value computed per site: ``{ count = "Bottleneck" }``, ``{ len = "m" }`` or
    ``{ fact = "kernel_size" }``.

    >>> Derivation("count", "Bottleneck").derive(Site("model.13", "csp", "C3", counts={"Bottleneck": 3}))
    3
    >>> Derivation("len", "m").derive(Site("model.12", "csp", "C2f", lengths={"m": 2, "cv1": 3}))
    2
    """

    kind: Literal["count", "len", "fact"]
    name: str  # a class name (count), an attribute of the matched module (len) or a fact name (fact)

    def derive(self, site: Site) -> Any:
        """The number of modules of class ``name`` inside the match, the number of modules directly inside the
        matched module's attribute ``name`` (a ``Sequential`` / ``ModuleList``, whatever their class), or the
        site's fact ``name``.

        Raises ``ValueError`` when the fact is unknown for this site, when the matched module has no such
        attribute, and when the count is zero: a class name cannot be checked when the file loads, and zero most
        often means a misspelt one.
        """
        if self.kind == "count":
            value = site.counts.get(self.name, 0)
            if value == 0:
                raise ValueError(
                    f"{self} found no {self.name} inside {site.module_type}; check the class name"
                )
            return value
        if self.kind == "len":
            if not site.lengths.get(self.name):
                held = ", ".join(name for name, n in site.lengths.items() if n) or "none"
                raise ValueError(
                    f"{self}: {site.module_type} holds no modules in an attribute {self.name!r}"
                    f" (attributes holding modules: {held})"
                )
            return site.lengths[self.name]
        value = site.facts()[self.name]
        if value is None:
            raise ValueError(f"{self}: {self.name} is unknown for {site.module_type}")
        return value

    def __str__(self) -> str:
        return f'{{ {self.kind} = "{self.name}" }}'


@dataclass(frozen=True)
class Replace:
    """A rule's ``replace``: a registered builder and its options, each a plain value or a :class:`Derivation`
    that the caller derives per site before calling :func:`rewrite.builders.build`."""

    builder: str
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]``: what to ``match``, the ``where`` tests a site must pass, and the ``replace``."""

    name: str
    match: Pattern
    replace: Replace
    where: tuple[Predicate, ...] = ()
    source: str = "<string>"  # the file it came from, for messages


@dataclass(frozen=True)
class RuleSet:
    """A rule file: its rules in file order (the matcher tries them in that order) and the default scope.

    ``scope`` is what the ``[ruleset]`` says, for :func:`rewrite.graph.resolve_scope`: a stage name, a module
    path, a glob, a tuple of those, or ``None`` (the whole model).
    """

    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    scope: str | tuple[str, ...] | None = None
    source: str = "<string>"
    # The TOML it was parsed from ("" when built in Python): a saved recipe keeps it, to redo the rewrite.
    text: str = field(default="", repr=False, compare=False)


def as_toml(value: Any) -> str:
    """A value spelt as in TOML: true/false, arrays in brackets, strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(as_toml(item) for item in value) + "]"
    return repr(value)


def _same(actual: Any, expected: Any) -> bool:
    return type(actual) is type(expected) and actual == expected


def _numbers(actual: Any) -> tuple[Any, ...] | None:
    """The fact's numbers (one per dimension), or ``None`` for a fact that is not numeric (padding 'same')."""
    values = actual if isinstance(actual, tuple) else (actual,)
    return values if all(is_number(value) for value in values) else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
