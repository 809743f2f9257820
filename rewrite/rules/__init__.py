"""The TOML rule format: load a rule file, check every key and value, and hand out frozen dataclasses.

What a rule is lives in :mod:`rewrite.rules.model`; reading and checking the TOML in :mod:`rewrite.rules.parse`.

A rule file is data: nothing in it is evaluated or imported, and builders are looked up by name in the
registry of :mod:`rewrite.builders`. The full reference is ``docs/rules.md``.

>>> rules = parse_rules('''
... [ruleset]
... name = "demo"
... scope = "neck"
...
... [[rule]]
... name = "conv-to-gsconv"
... match.chain = ["Conv2d", "BatchNorm2d?", "activation?"]
... where.out_channels = { multiple_of = 2 }
... replace.builder = "GSConv"
... ''')
>>> rule = rules.rules[0]
>>> [(step.name, step.optional) for step in rule.match.chain]
[('Conv2d', False), ('BatchNorm2d', True), ('activation', True)]
>>> rule.where[0].check(255)
'out_channels 255 is not a multiple of 2'
>>> load_rules("slim-neck").scope, builtin_rule_sets()
('neck', ['gsconv-only', 'slim-neck', 'slim-neck-v8', 'torchvision-fpn-gsconv'])

Every problem raises :class:`~rewrite.errors.RuleError` with a one-line message naming the file, the rule, the
key and what to do:

>>> parse_rules('[ruleset]\\nname = "x"\\n[[rule]]\\nname = "r"\\nmach.module = "C3"', "x.toml")
Traceback (most recent call last):
...
rewrite.errors.RuleError: x.toml: rule 'r': unknown key 'mach' in rule; did you mean 'match'?
"""

from rewrite.rules.model import ChainStep, Derivation, Pattern, Predicate, Replace, Rule, RuleSet
from rewrite.rules.parse import builtin_rule_sets, load_rules, parse_rules

__all__ = [
    "ChainStep",
    "Derivation",
    "Pattern",
    "Predicate",
    "Replace",
    "Rule",
    "RuleSet",
    "builtin_rule_sets",
    "load_rules",
    "parse_rules",
]
