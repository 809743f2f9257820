"""The TOML rule format: the built-in sets, every load error, predicates, chain steps, option validation."""

from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from rewrite.builders import Site, register_builder
from rewrite.errors import RuleError
from rewrite.rules import (
    ChainStep,
    Derivation,
    Predicate,
    builtin_rule_sets,
    load_rules,
    parse_rules,
)

HEADER = '[ruleset]\nname = "test"\n'
GSCONV = 'match.chain = ["Conv2d", "BatchNorm2d?", "activation?"]\nreplace.builder = "GSConv"\n'


def rule(body: str, name: str = "r") -> str:
    """A one-rule file around ``body``."""
    return f'{HEADER}[[rule]]\nname = "{name}"\n{body}'


def load_error(text: str, source: str = "rules/x.toml") -> str:
    """The message of the RuleError that ``text`` raises, checked to be one line that starts with the file."""
    with pytest.raises(RuleError) as caught:
        parse_rules(text, source)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{source}: ")
    return message


# --- built-in rule sets and loading ---


def test_builtin_rule_sets_are_listed():
    assert builtin_rule_sets() == ["gsconv-only", "slim-neck", "slim-neck-v8", "torchvision-fpn-gsconv"]


@pytest.mark.parametrize("name", ["gsconv-only", "slim-neck", "slim-neck-v8", "torchvision-fpn-gsconv"])
def test_each_builtin_loads_with_neck_scope(name):
    rule_set = load_rules(name)
    assert rule_set.name == name
    assert rule_set.scope == "neck"
    assert rule_set.description
    assert Path(rule_set.source).name == f"{name}.toml"
    assert all(rule.source == rule_set.source for rule in rule_set.rules)


def test_slim_neck_turns_csp_blocks_into_vovgscsp_then_convs_into_gsconv():
    csp, conv = load_rules("slim-neck").rules
    assert (csp.name, csp.match.module, csp.replace.builder) == (
        "csp-to-vovgscsp",
        ("C3", "BottleneckCSP"),
        "VoVGSCSP",
    )
    assert csp.replace.options == {
        "n": Derivation("count", "Bottleneck"),
        "shuffle": "split",
        "activation": "inherit",
    }
    assert (conv.name, conv.replace.builder) == ("conv-to-gsconv", "GSConv")
    assert [(step.name, step.optional) for step in conv.match.chain] == [
        ("Conv2d", False),
        ("BatchNorm2d", True),
        ("activation", True),
    ]
    assert {"C3", "BottleneckCSP", "VoVGSCSP", "GSConv", "GSBottleneck"} <= set(conv.match.not_inside)
    assert Predicate("groups", "eq", 1) in conv.where
    assert Predicate("out_channels", "multiple_of", 2) in conv.where
    assert conv.replace.options["activation"] == "inherit"


def test_gsconv_only_has_the_conv_rule_alone_and_leaves_csp_insides():
    [conv] = load_rules("gsconv-only").rules
    assert conv.replace.builder == "GSConv"
    assert {"C3", "BottleneckCSP"} <= set(conv.match.not_inside)


def test_torchvision_fpn_rule_takes_3x3_convs_only():
    [conv] = load_rules("torchvision-fpn-gsconv").rules
    assert conv.match.chain[0] == ChainStep("Conv2d")
    assert Predicate("kernel_size", "eq", 3) in conv.where


def test_load_rules_takes_a_path_a_string_path_or_a_rule_set(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(rule(GSCONV))
    from_path = load_rules(path)
    assert from_path.source == str(path)
    assert load_rules(str(path)) == from_path
    assert load_rules(from_path) is from_path


def test_unknown_rule_set_name_lists_the_builtins_and_suggests_one():
    with pytest.raises(RuleError) as caught:
        load_rules("slim_neck")
    message = str(caught.value)
    assert "gsconv-only, slim-neck, slim-neck-v8, torchvision-fpn-gsconv" in message
    assert "did you mean 'slim-neck'?" in message
    assert "\n" not in message


def test_a_file_that_is_not_utf8_is_a_rule_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[ruleset]\nname = "caf\xe9"\n')
    with pytest.raises(RuleError, match="cannot read the rule file"):
        load_rules(path)


def test_parse_rules_names_a_string_source_by_default():
    assert parse_rules(rule(GSCONV)).source == "<string>"
    with pytest.raises(RuleError, match=r"^<string>: "):
        parse_rules(HEADER)


def test_scope_may_be_a_list_and_where_values_are_typed():
    rule_set = parse_rules(
        '[ruleset]\nname = "t"\nscope = ["neck", "model.9"]\n[[rule]]\nname = "r"\n'
        + GSCONV
        + "where.kernel_size = { one_of = [1, [3, 3], [3, 1]] }\nwhere.bias = false\n"
        + 'where.stride = { range = [1, 2.5] }\nwhere.padding = { one_of = ["same", 1] }\n'
    )
    assert rule_set.scope == ("neck", "model.9")
    kernel, bias, stride, padding = rule_set.rules[0].where
    assert kernel == Predicate(
        "kernel_size", "one_of", (1, 3, (3, 1))
    )  # a square array is its int, as in Site
    assert bias == Predicate("bias", "eq", False)
    assert stride == Predicate("stride", "range", (1, 2.5))
    assert padding == Predicate("padding", "one_of", ("same", 1))


# --- every load error: one line naming file, rule, key and what to do ---

ERRORS = {
    "malformed TOML": (HEADER + "[[rule]]\nname = \n", ["invalid TOML", "line 4, column 8"]),
    "unknown top-level key": ("rules = 1\n" + HEADER, ["unknown key 'rules'", "did you mean 'rule'?"]),
    "no [ruleset]": ('[[rule]]\nname = "r"\n', ["missing [ruleset] table"]),
    "unknown ruleset key": (
        HEADER + 'scop = "neck"\n',
        ["[ruleset]", "unknown key 'scop'", "did you mean 'scope'?"],
    ),
    "ruleset name type": ("[ruleset]\nname = 3\n", ["[ruleset]", "name must be a non-empty string, got 3"]),
    "scope type": (HEADER + "scope = 3\n", ["[ruleset]", "scope must be", "got 3"]),
    "empty rule set": (HEADER, ["rule set 'test' has no rules", "add at least one [[rule]]"]),
    "rule not an array": (HEADER + '[rule]\nname = "r"\n', ["[[rule]]"]),
    "unknown rule key": (
        rule('mach.module = "C3"\n', "conv-to-gsconv"),
        ["rule 'conv-to-gsconv': unknown key 'mach' in rule; did you mean 'match'?"],
    ),
    "rule without name": (HEADER + "[[rule]]\n" + GSCONV, ["rule #1", "missing key 'name'"]),
    "duplicate rule names": (
        rule(GSCONV) + '[[rule]]\nname = "r"\n' + GSCONV,
        ["rule #2 'r'", "duplicate rule name 'r'", "rule #1", "rename one"],
    ),
    "no match": (rule('replace.builder = "GSConv"\n'), ["rule 'r'", "missing key 'match'", "match.chain"]),
    "both match kinds": (
        rule('match.module = "C3"\n' + GSCONV),
        ["rule 'r'", "match has both module and chain"],
    ),
    "neither match kind": (
        rule('match.not_inside = "C3"\nreplace.builder = "GSConv"\n'),
        ["match needs module or chain"],
    ),
    "unknown match key": (
        rule('match.modules = "C3"\nreplace.builder = "GSConv"\n'),
        ["unknown key 'modules' in match; did you mean 'module'?"],
    ),
    "module with a package": (
        rule('match.module = "models.common.C3"\nreplace.builder = "VoVGSCSP"\n'),
        ["match.module", "'models.common.C3' is not a class name", "e.g. 'C3'"],
    ),
    "empty module list": (
        rule('match.module = []\nreplace.builder = "VoVGSCSP"\n'),
        ["match.module must be"],
    ),
    "chain not an array": (
        rule('match.chain = "Conv2d"\nreplace.builder = "GSConv"\n'),
        ["match.chain must be a non-empty array"],
    ),
    "empty chain step": (
        rule('match.chain = ["Conv2d", ""]\nreplace.builder = "GSConv"\n'),
        ["match.chain step 2 '' is not a step", "'?'"],
    ),
    "chain step syntax": (
        rule('match.chain = ["Conv2d", "?"]\nreplace.builder = "GSConv"\n'),
        ["match.chain step 2 '?' is not a step"],
    ),
    "unknown chain category": (
        rule('match.chain = ["Conv2d", "activ?"]\nreplace.builder = "GSConv"\n'),
        ["match.chain step 2", "unknown chain category 'activ'", "did you mean 'activation'?"],
    ),
    "chain starts optional": (
        rule('match.chain = ["Conv2d?"]\nreplace.builder = "GSConv"\n'),
        ["step 1 'Conv2d?' is optional", "must start with a required step"],
    ),
    "unknown fact": (rule(GSCONV + "where.group = 1\n"), ["where.group", "did you mean 'groups'?"]),
    "unknown predicate kind": (
        rule(GSCONV + "where.out_channels = { multiple = 2 }\n"),
        ["where.out_channels", "unknown predicate 'multiple'", "did you mean 'multiple_of'?"],
    ),
    "two predicate kinds": (
        rule(GSCONV + "where.kernel_size = { eq = 1, one_of = [3] }\n"),
        ["where.kernel_size", "exactly one of eq, one_of, range, multiple_of", "'eq', 'one_of'"],
    ),
    "bare array": (
        rule(GSCONV + "where.kernel_size = [1, 3]\n"),
        ["where.kernel_size", "{ one_of = [...] }"],
    ),
    "bool for an int fact": (
        rule(GSCONV + "where.groups = true\n"),
        ["where.groups", "expected an integer, got true"],
    ),
    "int for a bool fact": (rule(GSCONV + "where.bias = 1\n"), ["where.bias", "expected a boolean, got 1"]),
    "range on a bool fact": (
        rule(GSCONV + "where.depthwise = { range = [0, 1] }\n"),
        ["where.depthwise", "range needs a numeric fact", "use eq or one_of"],
    ),
    "range of one number": (
        rule(GSCONV + "where.stride = { range = [1] }\n"),
        ["where.stride.range takes two numbers [lo, hi]"],
    ),
    "empty range": (
        rule(GSCONV + "where.stride = { range = [2, 1] }\n"),
        ["where.stride.range [2, 1] is empty"],
    ),
    "multiple_of zero": (
        rule(GSCONV + "where.out_channels = { multiple_of = 0 }\n"),
        ["where.out_channels.multiple_of takes a positive integer, got 0"],
    ),
    "empty one_of": (
        rule(GSCONV + "where.activation = { one_of = [] }\n"),
        ["where.activation.one_of", "non-empty"],
    ),
    "where not a table": (rule(GSCONV + "where = 1\n"), ["where must be a table"]),
    "no builder": (rule('match.module = "C3"\nreplace.n = 1\n'), ["missing key 'replace.builder'"]),
    "unknown builder": (
        rule('match.module = "C3"\nreplace.builder = "GSconv"\n'),
        ["replace.builder", "unknown builder 'GSconv'", "did you mean 'GSConv'?", "@register_builder"],
    ),
    "unknown builder, nothing close": (
        rule('match.module = "C3"\nreplace.builder = "Zzz"\n'),
        ["unknown builder 'Zzz'", "expected one of: GSBottleneck, GSConv, "],
    ),
    "unknown option": (
        rule(GSCONV + 'replace.shufle = "split"\n'),
        ["unknown key 'shufle' in replace", "options of GSConv", "did you mean 'shuffle'?"],
    ),
    "option value not allowed": (
        rule(GSCONV + 'replace.shuffle = "splt"\n'),
        [
            "replace.shuffle",
            "GSConv expects one of 'split', 'interleave', got 'splt'",
            "did you mean 'split'?",
        ],
    ),
    "bool for an int option": (
        rule(GSCONV + "replace.dw_kernel = true\n"),
        ["replace.dw_kernel", "expects an integer, got true"],
    ),
    "float for an int option": (rule(GSCONV + "replace.dw_kernel = 5.0\n"), ["expects an integer, got 5.0"]),
    "array option": (rule(GSCONV + "replace.dw_kernel = [5]\n"), ["replace.dw_kernel", "got an array"]),
    "unknown derivation": (
        rule('match.module = "C3"\nreplace.builder = "VoVGSCSP"\nreplace.n = { cont = "B" }\n'),
        ["replace.n", "unknown derivation 'cont'", "did you mean 'count'?"],
    ),
    "derivation with two keys": (
        rule('match.module = "C3"\nreplace.builder = "VoVGSCSP"\nreplace.n = { count = "B", fact = "x" }\n'),
        ["replace.n", '{ count = "ClassName" }, { len = "attribute" } or { fact = "name" }'],
    ),
    "derivation of an unknown fact": (
        rule('match.module = "C3"\nreplace.builder = "VoVGSCSP"\nreplace.n = { fact = "kernel" }\n'),
        ["replace.n.fact", "unknown fact 'kernel'", "did you mean 'kernel_size'?"],
    ),
    "derivation of the wrong type": (
        rule(
            'match.module = "C3"\nreplace.builder = "VoVGSCSP"\nreplace.shuffle = { count = "Bottleneck" }\n'
        ),
        ["replace.shuffle", "expects one of 'split', 'interleave'", 'got { count = "Bottleneck" }'],
    ),
}


@pytest.mark.parametrize("text, fragments", ERRORS.values(), ids=list(ERRORS))
def test_load_errors_are_one_line_and_say_where_and_what_to_do(text, fragments):
    message = load_error(text)
    for fragment in fragments:
        assert fragment in message


# --- predicates ---


@pytest.mark.parametrize(
    "predicate, actual, reason",
    [
        (Predicate("groups", "eq", 1), 1, None),
        (Predicate("groups", "eq", 1), 2, "groups 2 is not 1"),
        (Predicate("bias", "eq", False), True, "bias true is not false"),
        (Predicate("activation", "eq", "SiLU"), "ReLU", "activation 'ReLU' is not 'SiLU'"),
        (Predicate("kernel_size", "one_of", (1, 3)), 3, None),
        (Predicate("kernel_size", "one_of", (1, 3)), 5, "kernel_size 5 is not one of [1, 3]"),
        (Predicate("kernel_size", "one_of", ((3, 1),)), (3, 1), None),
        (Predicate("stride", "range", (1, 2)), 2, None),
        (Predicate("stride", "range", (1, 2)), 4, "stride 4 is not in range [1, 2]"),
        (Predicate("stride", "range", (1, 2)), (1, 2), None),  # every dimension in range
        (Predicate("stride", "range", (1, 2)), (1, 3), "stride [1, 3] is not in range [1, 2]"),
        (Predicate("padding", "range", (0, 1)), "same", "padding 'same' is not in range [0, 1]"),
        (Predicate("out_channels", "multiple_of", 2), 256, None),
        (Predicate("out_channels", "multiple_of", 2), 255, "out_channels 255 is not a multiple of 2"),
        (Predicate("kernel_size", "eq", 3), None, "kernel_size unknown"),
    ],
)
def test_predicate_check(predicate, actual, reason):
    assert predicate.check(actual) == reason


def test_predicate_names_the_module_type_when_a_fact_is_unknown():
    assert Predicate("kernel_size", "one_of", (1, 3)).check(None, "C3") == "kernel_size unknown for C3"


# --- chain steps ---


def test_a_class_step_accepts_calls_of_that_class_only():
    step = ChainStep("BatchNorm2d", optional=True)
    assert step.accepts("call_module", "model.0.bn", nn.BatchNorm2d(8))
    assert not step.accepts("call_module", "model.0.bn", nn.BatchNorm1d(8))
    assert not step.accepts("call_function", F.batch_norm, None)


@pytest.mark.parametrize(
    "category, op, target, module",
    [
        ("conv", "call_module", "c", nn.Conv2d(1, 1, 1)),
        ("conv", "call_function", F.conv2d, None),
        ("norm", "call_module", "bn", FrozenBatchNorm2d(8)),
        ("norm", "call_module", "gn", nn.GroupNorm(2, 8)),
        ("activation", "call_module", "act", nn.SiLU()),
        ("activation", "call_module", "act", nn.Identity()),
        ("activation", "call_function", torch.relu, None),
        ("activation", "call_function", F.hardswish, None),
        ("activation", "call_method", "sigmoid", None),
    ],
)
def test_a_category_step_accepts_modules_functions_and_methods(category, op, target, module):
    assert ChainStep(category).accepts(op, target, module)


@pytest.mark.parametrize(
    "category, op, target, module",
    [
        ("conv", "call_module", "l", nn.Linear(1, 1)),
        ("conv", "call_function", F.relu, None),
        ("activation", "call_method", "add", None),
        ("activation", "get_attr", "weight", None),
        ("norm", "call_module", "act", nn.SiLU()),
    ],
)
def test_a_category_step_rejects_everything_else(category, op, target, module):
    assert not ChainStep(category).accepts(op, target, module)


# --- derivations ---


def test_derivations_give_a_count_or_a_fact_per_site():
    site = Site("model.13", "csp", "C3", kernel_size=(3, 3), counts={"Bottleneck": 3})
    assert Derivation("count", "Bottleneck").derive(site) == 3
    assert Derivation("fact", "kernel_size").derive(site) == 3
    assert str(Derivation("count", "Bottleneck")) == '{ count = "Bottleneck" }'


def test_a_zero_count_or_an_unknown_fact_cannot_be_derived():
    site = Site("model.13", "csp", "C3", counts={"Bottleneck": 3})
    with pytest.raises(ValueError, match="found no Botleneck inside C3"):
        Derivation("count", "Botleneck").derive(site)
    with pytest.raises(ValueError, match="kernel_size is unknown for C3"):
        Derivation("fact", "kernel_size").derive(site)


# --- options checked against a builder's signature ---


@pytest.fixture
def custom_builder():
    """A builder with every kind of option annotation, registered for one test."""

    @register_builder("TestBlock", override=True)
    def test_block(
        site: Site,
        width: int,
        *,
        ratio: float = 0.5,
        mode: Literal["a", "b"] = "a",
        label: str | None = None,
        flag=False,
        anything=None,
    ) -> nn.Module:
        return nn.Conv2d(site.in_channels, width, 1)

    yield "TestBlock"
    from rewrite import builders

    del builders._REGISTRY["TestBlock"]


def custom_rule(options: str) -> str:
    return rule('match.module = "C3"\nreplace.builder = "TestBlock"\n' + options)


def test_options_are_checked_against_the_annotations(custom_builder):
    replace = (
        parse_rules(
            custom_rule(
                'replace.width = 8\nreplace.ratio = 1\nreplace.mode = "b"\nreplace.label = "x"\n'
                'replace.flag = true\nreplace.anything = "whatever"\n'
            )
        )
        .rules[0]
        .replace
    )
    assert replace.builder == "TestBlock"
    assert replace.options == {
        "width": 8,
        "ratio": 1,
        "mode": "b",
        "label": "x",
        "flag": True,
        "anything": "whatever",
    }
    # a count derives an int, kernel_size derives an int or a tuple: both can be a width
    for derivation in ('{ count = "Bottleneck" }', '{ fact = "kernel_size" }'):
        assert parse_rules(custom_rule(f"replace.width = {derivation}\n")).rules[0].replace.options["width"]


@pytest.mark.parametrize(
    "options, fragments",
    [
        ("", ["replace.width", "builder TestBlock needs this option"]),
        ('replace.width = "8"\n', ["replace.width", "TestBlock expects an integer, got '8'"]),
        ('replace.width = 8\nreplace.ratio = "half"\n', ["replace.ratio", "expects a number"]),
        ('replace.width = 8\nreplace.mode = "c"\n', ["replace.mode", "one of 'a', 'b'"]),
        ("replace.width = 8\nreplace.label = 1\n", ["replace.label", "expects a string, got 1"]),
        ("replace.width = 8\nreplace.flag = 1\n", ["replace.flag", "expects a boolean, got 1"]),
        ('replace.width = { fact = "activation" }\n', ["replace.width", 'got { fact = "activation" }']),
        (
            "replace.width = 8\nreplace.widht = 8\n",
            ["unknown key 'widht' in replace", "did you mean 'width'?"],
        ),
    ],
)
def test_option_errors_follow_the_builder_signature(custom_builder, options, fragments):
    message = load_error(custom_rule(options))
    for fragment in ["rule 'r'", *fragments]:
        assert fragment in message


# --- values that load but could never work: checked against the builder's declared ranges ---


@pytest.mark.parametrize(
    "options, message",
    [
        ("replace.n = -2", "replace.n: VoVGSCSP expects an integer >= 1, got -2"),
        ("replace.n = 0", "replace.n: VoVGSCSP expects an integer >= 1, got 0"),
        ("replace.dw_kernel = -3", "replace.dw_kernel: VoVGSCSP expects an odd integer >= 1, got -3"),
        ("replace.dw_kernel = 4", "replace.dw_kernel: VoVGSCSP expects an odd integer >= 1, got 4"),
        ("replace.expansion = 0.0", "replace.expansion: VoVGSCSP expects a number > 0, got 0.0"),
        ("replace.expansion = -1", "replace.expansion: VoVGSCSP expects a number > 0, got -1"),
        ("replace.expansion = nan", "replace.expansion: VoVGSCSP expects a number > 0, got nan"),
        ("replace.expansion = inf", "replace.expansion: VoVGSCSP expects a number > 0, got inf"),
    ],
)
def test_option_values_outside_the_builders_range_fail_at_load(options, message):
    text = rule(f'match.module = "C3"\nreplace.builder = "VoVGSCSP"\n{options}\n')
    assert load_error(text) == f"rules/x.toml: rule 'r': {message}"


def test_option_values_inside_the_range_load():
    text = rule(
        'match.module = "C3"\nreplace.builder = "GSBottleneck"\nreplace.kernel_size = 1\n'
        "replace.dw_kernel = 3\nreplace.expansion = 2\n"
    )
    assert dict(parse_rules(text).rules[0].replace.options) == {
        "kernel_size": 1,
        "dw_kernel": 3,
        "expansion": 2,
    }
    # A derived value is known per site only: build() checks it (tests/test_builders.py).
    text = rule(f'{GSCONV}replace.dw_kernel = {{ fact = "kernel_size" }}\n')
    assert parse_rules(text).rules[0].replace.options["dw_kernel"] == Derivation("fact", "kernel_size")


@pytest.mark.parametrize(
    "test, message",
    [
        (
            "{ range = [nan, 5] }",
            "where.stride.range [nan, 5] holds nan, which no value is in; write numbers",
        ),
        (
            "{ range = [1, nan] }",
            "where.stride.range [1, nan] holds nan, which no value is in; write numbers",
        ),
        ("{ range = [1.2, 1.8] }", "where.stride.range [1.2, 1.8] holds no integer; stride is an integer"),
        ("{ range = [inf, inf] }", "where.stride.range [inf, inf] holds no integer; stride is an integer"),
        (
            "{ range = [-inf, -inf] }",
            "where.stride.range [-inf, -inf] holds no integer; stride is an integer",
        ),
    ],
)
def test_a_range_that_admits_nothing_fails_at_load(test, message):
    assert load_error(rule(f"{GSCONV}where.stride = {test}\n")) == f"rules/x.toml: rule 'r': {message}"


def test_open_ended_and_fractional_ranges_load():
    text = rule(f"{GSCONV}where.stride = {{ range = [1.5, inf] }}\nwhere.groups = {{ range = [-inf, 1] }}\n")
    stride, groups = parse_rules(text).rules[0].where
    assert (stride.check(2), stride.check(1), groups.check(1)) == (
        None,
        "stride 1 is not in range [1.5, inf]",
        None,
    )


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{ a = ", " }")])
def test_a_deeply_nested_file_is_a_one_line_rule_error(opening, closing):
    text = f"{HEADER}x = {opening * 1000}1{closing * 1000}\n"
    assert load_error(text) == (
        "rules/x.toml: invalid TOML: arrays or tables nested too deeply to read; no rule needs more than a few levels"
    )
