"""Reading the TOML rule format: every key and value checked, each problem one :class:`~rewrite.errors.RuleError`.

A rule file is data: nothing in it is evaluated or imported, and builders are looked up by name in the
registry of :mod:`rewrite.builders`, whose signatures type the ``replace`` options. Messages start with where
the problem is (``file: rule 'name'``) and end with what to do.
"""

from __future__ import annotations

import difflib
import importlib.resources
import inspect
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, NoReturn, Union, get_args, get_origin

from rewrite.builders import builder_options, check_option, list_builders
from rewrite.errors import RuleError
from rewrite.rules.model import (
    ChainStep,
    Derivation,
    Pattern,
    Predicate,
    Replace,
    Rule,
    RuleSet,
    as_toml,
    is_number,
)
from rewrite.site import Site
from rewrite.vocabulary import CATEGORIES

_CATEGORIES = tuple(sorted(CATEGORIES))

_TOP_KEYS = ("ruleset", "rule")
_RULESET_KEYS = ("name", "description", "scope")
_RULE_KEYS = ("name", "match", "where", "replace")
_MATCH_KEYS = ("module", "chain", "not_inside")
_PREDICATE_KINDS = ("eq", "one_of", "range", "multiple_of")
_DERIVATION_KINDS = ("count", "len", "fact")

# The package the built-in rule sets ship in (the repository's rules/ folder, mapped in pyproject.toml).
# Not "rewrite.rules": that is the package that reads them.
_BUILTINS_PACKAGE = "rewrite.rulesets"

_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CHAIN_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\?)?")


def builtin_rule_sets() -> list[str]:
    """Names of the rule sets that ship with the package (the ``rules/*.toml`` files), sorted."""
    package = importlib.resources.files(_BUILTINS_PACKAGE)
    return sorted(
        entry.name.removesuffix(".toml") for entry in package.iterdir() if entry.name.endswith(".toml")
    )


def load_rules(spec: str | os.PathLike[str] | RuleSet) -> RuleSet:
    """A rule set from a built-in name (``"slim-neck"``), a TOML file path, or a :class:`RuleSet` (as is).

    A bare name that is a built-in wins over a file of that name in the working directory.
    """
    if isinstance(spec, RuleSet):
        return spec
    if isinstance(spec, str) and spec in builtin_rule_sets():
        resource = importlib.resources.files(_BUILTINS_PACKAGE).joinpath(f"{spec}.toml")
        return parse_rules(resource.read_text(encoding="utf-8"), str(resource))
    path = Path(spec)
    if not path.is_file():
        builtins = builtin_rule_sets()
        close = _closest(os.fspath(spec), builtins)
        hint = f"; did you mean {close!r}?" if close else ""
        raise RuleError(
            f"{os.fspath(spec)!r} is neither a file nor a built-in rule set ({', '.join(builtins)}){hint}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(f"{path}: cannot read the rule file: {' '.join(str(exc).split())}") from exc
    return parse_rules(text, os.fspath(spec))


def parse_rules(text: str, source: str = "<string>") -> RuleSet:
    """A rule set from TOML text; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise RuleError(
            f"{source}: invalid TOML: arrays or tables nested too deeply to read; no rule needs more than a few levels"
        ) from None
    _check_keys(data, _TOP_KEYS, source, "the file (top level)")

    if "ruleset" not in data:
        _fail(source, 'missing [ruleset] table; start the file with [ruleset] and name = "..."')
    meta = data["ruleset"]
    if not isinstance(meta, dict):
        _fail(source, f"ruleset must be a table: write a [ruleset] header, got {_got(meta)}")
    at = f"{source}: [ruleset]"
    _check_keys(meta, _RULESET_KEYS, at, "[ruleset]")
    name = _required_string(meta, "name", at)
    description = meta.get("description", "")
    if not isinstance(description, str):
        _fail(at, f"description must be a string, got {_got(description)}")
    scope = _scope(meta["scope"], at) if "scope" in meta else None

    tables = data.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        _fail(source, "rule must be an array of tables: write each rule under its own [[rule]] header")
    if not tables:
        _fail(source, f"rule set {name!r} has no rules; add at least one [[rule]] table")
    rules: list[Rule] = []
    first_index: dict[str, int] = {}
    for index, table in enumerate(tables, start=1):
        rule = _parse_rule(table, index, source)
        if rule.name in first_index:
            _fail(
                f"{source}: rule #{index} {rule.name!r}",
                f"duplicate rule name {rule.name!r} (rule #{first_index[rule.name]} has it too); rename one",
            )
        first_index[rule.name] = index
        rules.append(rule)
    return RuleSet(name, tuple(rules), description, scope, source, text)


# --- parsing: each function takes `at`, the "file: rule 'x'" prefix that its error messages start with ---


def _parse_rule(table: dict[str, Any], index: int, source: str) -> Rule:
    name = table.get("name")
    at = f"{source}: rule {name!r}" if isinstance(name, str) and name else f"{source}: rule #{index}"
    _check_keys(table, _RULE_KEYS, at, "rule")
    name = _required_string(table, "name", at)
    match = _parse_match(
        _required_table(table, "match", "match.module = [...] or match.chain = [...]", at), at
    )
    where = tuple(_parse_predicate(key, value, at) for key, value in _table(table, "where", at).items())
    replace = _parse_replace(_required_table(table, "replace", 'replace.builder = "..."', at), at)
    return Rule(name, match, replace, where, source)


def _parse_match(table: dict[str, Any], at: str) -> Pattern:
    _check_keys(table, _MATCH_KEYS, at, "match")
    if ("module" in table) == ("chain" in table):
        both_or_neither = "has both module and chain" if "module" in table else "needs module or chain"
        _fail(at, f"match {both_or_neither}; give exactly one: module (class names) or chain (op steps)")
    not_inside = _class_names(table["not_inside"], "match.not_inside", at) if "not_inside" in table else ()
    if "module" in table:
        return Pattern(module=_class_names(table["module"], "match.module", at), not_inside=not_inside)
    steps = table["chain"]
    if not isinstance(steps, list) or not steps:
        _fail(at, f"match.chain must be a non-empty array of steps, got {_got(steps)}")
    chain = tuple(_parse_step(step, position, at) for position, step in enumerate(steps, start=1))
    return Pattern(chain=chain, not_inside=not_inside)


def _parse_step(text: Any, position: int, at: str) -> ChainStep:
    key = f"match.chain step {position}"
    if not isinstance(text, str):
        _fail(at, f"{key} must be a string, got {_got(text)}")
    syntax = _CHAIN_STEP.fullmatch(text)
    if syntax is None:
        _fail(
            at,
            f"{key} {text!r} is not a step; write a class name such as 'Conv2d' or a category "
            f"({', '.join(_CATEGORIES)}), with a trailing '?' when optional",
        )
    name, optional = syntax[1], syntax[2] is not None
    if name[0].islower() and name not in CATEGORIES:
        _fail(
            at,
            f"{key}: unknown chain category {name!r}{_did_you_mean(name, _CATEGORIES)} "
            "(class names start with a capital letter)",
        )
    if position == 1 and optional:
        _fail(at, f"{key} {text!r} is optional; a chain must start with a required step")
    return ChainStep(name, optional)


def _parse_predicate(key: str, value: Any, at: str) -> Predicate:
    label = f"where.{key}"
    if key not in Site.FACT_TYPES:
        _fail(at, f"{label}: unknown fact {key!r}{_did_you_mean(key, list(Site.FACT_TYPES))}")
    types = Site.FACT_TYPES[key]
    if isinstance(value, list):
        _fail(at, f"{label}: a bare array is ambiguous; write {{ one_of = [...] }} for alternatives")
    if not isinstance(value, dict):
        return Predicate(key, "eq", _fact_value(value, types, label, at))
    if len(value) != 1:
        kinds = ", ".join(_PREDICATE_KINDS)
        _fail(at, f"{label}: a predicate table holds exactly one of {kinds}, got {_keys(value)}")
    [(kind, argument)] = value.items()
    if kind not in _PREDICATE_KINDS:
        _fail(at, f"{label}: unknown predicate {kind!r}{_did_you_mean(kind, _PREDICATE_KINDS)}")
    if kind in ("range", "multiple_of") and int not in types:
        _fail(
            at,
            f"{label}: {kind} needs a numeric fact, and {key} is {_fact_type_names(types)}; use eq or one_of",
        )
    if kind == "eq":
        return Predicate(key, kind, _fact_value(argument, types, f"{label}.eq", at))
    if kind == "one_of":
        if not isinstance(argument, list) or not argument:
            _fail(at, f"{label}.one_of takes a non-empty array, got {_got(argument)}")
        return Predicate(key, kind, tuple(_fact_value(v, types, f"{label}.one_of", at) for v in argument))
    if kind == "range":
        return Predicate(key, kind, _range_bounds(argument, key, label, at))
    if type(argument) is not int or argument <= 0:
        _fail(at, f"{label}.multiple_of takes a positive integer, got {_got(argument)}")
    return Predicate(key, kind, argument)


def _range_bounds(argument: Any, key: str, label: str, at: str) -> tuple[float, float]:
    if not (isinstance(argument, list) and len(argument) == 2 and all(map(is_number, argument))):
        _fail(at, f"{label}.range takes two numbers [lo, hi], got {_got(argument)}")
    low, high = argument
    if math.isnan(low) or math.isnan(high):
        _fail(
            at,
            f"{label}.range [{as_toml(low)}, {as_toml(high)}] holds nan, which no value is in; write numbers",
        )
    if low > high:
        _fail(at, f"{label}.range [{low}, {high}] is empty; write [lo, hi] with lo <= hi")
    # Numeric facts are integers: a range without one (or with nothing but an infinity) admits nothing.
    lowest = math.ceil(low) if math.isfinite(low) else low
    highest = math.floor(high) if math.isfinite(high) else high
    if lowest > highest or lowest == math.inf or highest == -math.inf:
        _fail(at, f"{label}.range [{as_toml(low)}, {as_toml(high)}] holds no integer; {key} is an integer")
    return low, high


def _fact_value(value: Any, types: tuple[type, ...], label: str, at: str) -> Any:
    """A value to compare a fact with, typed like the fact; a square array is one int, as in facts."""
    if tuple in types and isinstance(value, list) and value and all(type(item) is int for item in value):
        return value[0] if len(set(value)) == 1 else tuple(value)
    # bool is an int subclass in Python: compare exact types so `groups = true` is not `groups = 1`.
    if type(value) not in types:
        _fail(at, f"{label}: expected {_fact_type_names(types)}, got {_got(value)}")
    return value


def _parse_replace(table: dict[str, Any], at: str) -> Replace:
    builder = _required_string(table, "builder", at, key_label="replace.builder")
    registered = list_builders()
    if builder not in registered:
        _fail(
            at,
            f"replace.builder: unknown builder {builder!r}{_did_you_mean(builder, registered)} "
            "(register others in Python with @register_builder before loading)",
        )
    options = builder_options(builder)
    _check_keys(table, ("builder", *options), at, f"replace (options of {builder}: {', '.join(options)})")
    values = {
        name: _option_value(builder, options[name], value, at)
        for name, value in table.items()
        if name != "builder"
    }
    for name, parameter in options.items():
        if parameter.default is inspect.Parameter.empty and name not in values:
            _fail(at, f"replace.{name}: builder {builder} needs this option; add replace.{name} = ...")
    return Replace(builder, values)


def _option_value(builder: str, parameter: inspect.Parameter, value: Any, at: str) -> Any:
    label = f"replace.{parameter.name}"
    if isinstance(value, dict):
        value = _parse_derivation(value, label, at)
    elif not isinstance(value, (str, int, float, bool)):
        _fail(
            at,
            f'{label}: expected a string, number, boolean, {{ count = "Class" }} or {{ fact = "name" }}, '
            f"got {_got(value)}",
        )
    if not _admits(parameter.annotation, value):
        literals = [arg for arg in get_args(parameter.annotation) if isinstance(arg, str)]
        hint = _did_you_mean(value, literals) if isinstance(value, str) and literals else ""
        shown = value if isinstance(value, Derivation) else _got(value)
        _fail(at, f"{label}: {builder} expects {_describe(parameter.annotation)}, got {shown}{hint}")
    # A derived value is only known per site; rewrite.builders.build checks it then.
    problem = None if isinstance(value, Derivation) else check_option(builder, parameter.name, value)
    if problem:
        _fail(at, f"{label}: {problem}")
    return value


def _parse_derivation(table: dict[str, Any], label: str, at: str) -> Derivation:
    usage = 'a derived value is { count = "ClassName" }, { len = "attribute" } or { fact = "name" }'
    if len(table) != 1:
        _fail(at, f"{label}: {usage}, got {_keys(table)}")
    [(kind, name)] = table.items()
    if kind not in _DERIVATION_KINDS:
        _fail(at, f"{label}: unknown derivation {kind!r}{_did_you_mean(kind, _DERIVATION_KINDS)}")
    if kind == "count":
        return Derivation(kind, _class_names(name, f"{label}.count", at, single=True)[0])
    if kind == "len":
        if not isinstance(name, str) or _CLASS_NAME.fullmatch(name) is None:
            _fail(
                at, f'{label}.len: must name an attribute of the matched module (like "m"), got {_got(name)}'
            )
        return Derivation(kind, name)
    if not isinstance(name, str) or name not in Site.FACT_TYPES:
        hint = _did_you_mean(name, list(Site.FACT_TYPES)) if isinstance(name, str) else ""
        _fail(at, f"{label}.fact: unknown fact {_got(name)}{hint}")
    return Derivation(kind, name)


def _class_names(value: Any, key: str, at: str, *, single: bool = False) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) or single else value
    if not isinstance(names, list) or not names:
        _fail(at, f"{key} must be a class name or a non-empty array of them, got {_got(value)}")
    for name in names:
        if not isinstance(name, str):
            _fail(at, f"{key} must hold class names (strings), got {_got(name)}")
        if _CLASS_NAME.fullmatch(name) is None:
            last = name.rpartition(".")[2]
            hint = f"; write the class name alone, e.g. {last!r}" if _CLASS_NAME.fullmatch(last) else ""
            _fail(at, f"{key}: {name!r} is not a class name{hint}")
    return tuple(names)


def _scope(value: Any, at: str) -> str | tuple[str, ...]:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(item, str) and item for item in value):
        return tuple(value)
    _fail(
        at,
        f"scope must be a stage name, module path or glob, or a non-empty array of them, got {_got(value)}",
    )


# --- type checks of option values against builder signatures ---


def _admits(annotation: Any, value: Any) -> bool:
    """Whether ``value`` (for a :class:`Derivation`: any value it can resolve to) fits ``annotation``."""
    if annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Union or origin is UnionType:
        return any(_admits(arg, value) for arg in get_args(annotation))
    if origin is Literal:
        if isinstance(value, Derivation):
            return any(isinstance(arg, _derived_types(value)) for arg in get_args(annotation))
        return any(type(arg) is type(value) and arg == value for arg in get_args(annotation))
    expected = origin if isinstance(origin, type) else annotation
    if not isinstance(expected, type):
        return True  # a typing construct we do not model: the builder checks its own argument
    candidates = _derived_types(value) if isinstance(value, Derivation) else (type(value),)
    return any(_type_fits(candidate, expected) for candidate in candidates)


def _type_fits(candidate: type, expected: type) -> bool:
    if expected is float:
        return candidate in (int, float)  # the numeric tower: an int is a fine float
    if expected is int:
        return candidate is int  # but a bool is not an int here
    return issubclass(candidate, expected)


def _derived_types(derivation: Derivation) -> tuple[type, ...]:
    return (int,) if derivation.kind in ("count", "len") else Site.FACT_TYPES[derivation.name]


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Union or origin is UnionType:
        return " or ".join(_describe(arg) for arg in get_args(annotation) if arg is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(as_toml(arg) for arg in get_args(annotation))
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


# --- messages ---

_TYPE_NAMES: Mapping[type, str] = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    tuple: "an array of integers",
    list: "an array",
    dict: "a table",
}


def _fail(at: str, message: str) -> NoReturn:
    raise RuleError(f"{at}: {message}")


def _closest(word: str, candidates: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, candidates, n=1)
    return close[0] if close else None


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """The closest candidate as a suggestion, or (when none is close) the whole list."""
    close = _closest(word, candidates)
    if close:
        return f"; did you mean {close!r}?"
    return f"; expected one of: {', '.join(candidates)}" if candidates else ""


def _check_keys(table: Mapping[str, Any], valid: Sequence[str], at: str, where: str) -> None:
    for key in table:
        if key not in valid:
            _fail(at, f"unknown key {key!r} in {where}{_did_you_mean(key, valid)}")


def _required_string(table: Mapping[str, Any], key: str, at: str, *, key_label: str | None = None) -> str:
    label = key_label or key
    if key not in table:
        _fail(at, f'missing key {label!r}; add {label} = "..."')
    value = table[key]
    if not isinstance(value, str) or not value:
        _fail(at, f"{label} must be a non-empty string, got {_got(value)}")
    return value


def _table(table: Mapping[str, Any], key: str, at: str) -> dict[str, Any]:
    value = table.get(key, {})
    if not isinstance(value, dict):
        _fail(at, f"{key} must be a table ({key}.name = ...), got {_got(value)}")
    return value


def _required_table(table: Mapping[str, Any], key: str, example: str, at: str) -> dict[str, Any]:
    if key not in table:
        _fail(at, f"missing key {key!r}; add {example}")
    return _table(table, key, at)


def _keys(table: Mapping[str, Any]) -> str:
    return ", ".join(map(repr, table)) if table else "an empty table"


def _fact_type_names(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES[t] for t in types)


def _got(value: Any) -> str:
    """A value as "got ..." shows it: containers by their type (they can be long), scalars as written."""
    if isinstance(value, (list, dict)):
        return _TYPE_NAMES[type(value)]
    if isinstance(value, (str, int, float, bool)):
        return as_toml(value)
    return type(value).__name__
