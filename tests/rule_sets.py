"""The rule set the tests write most: one rule that replaces a chain of modules with a builder's block.

Tests in any file may import it; each names only what its case changes (the chain, the builder, the ``where``
conditions, the builder's options) and gets the TOML a user would write, or its parsed rule set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import rewrite

# conv → norm → activation chains: by class name, and by the op table's categories.
CONV_BN_ACT = ("Conv2d", "BatchNorm2d?", "activation?")
CONV_NORM_ACT = ("conv", "norm", "activation?")
# Where a GSConv can take the conv's place: one group, the map's size kept, an even number of outputs.
GSCONV_FITS = {"groups": 1, "same_size": True, "out_channels": {"multiple_of": 2}}


def _toml(value: object) -> str:
    """``value`` as TOML: a string, boolean, number, array or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string escapes as JSON does
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return str(value)


def chain_rule_toml(
    chain: Sequence[str] = CONV_BN_ACT,
    builder: str = "GSConv",
    *,
    where: Mapping[str, object] | None = None,
    name: str = "chain",
    rule: str = "conv-to-gsconv",
    scope: str | None = None,
    not_inside: Sequence[str] = (),
    **options: object,
) -> str:
    """The TOML of rule set ``name``, scoped to ``scope``, with one rule: ``chain`` (outside ``not_inside``)
    replaced by ``builder`` with ``options``, where each of ``where``'s facts holds."""
    lines = ["[ruleset]", f"name = {_toml(name)}"]
    if scope is not None:
        lines.append(f"scope = {_toml(scope)}")
    lines += ["[[rule]]", f"name = {_toml(rule)}", f"match.chain = {_toml(chain)}"]
    if not_inside:
        lines.append(f"match.not_inside = {_toml(not_inside)}")
    lines += [f"where.{fact} = {_toml(value)}" for fact, value in (where or {}).items()]
    lines += [f"replace.{key} = {_toml(value)}" for key, value in {"builder": builder, **options}.items()]
    return "\n".join(lines) + "\n"


def chain_rules(
    chain: Sequence[str] = CONV_BN_ACT, builder: str = "GSConv", **settings: object
) -> rewrite.RuleSet:
    """:func:`chain_rule_toml`'s rule set, parsed."""
    return rewrite.parse_rules(chain_rule_toml(chain, builder, **settings))
