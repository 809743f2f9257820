"""The ``rewrite`` command's parser: its commands, their options, and the options they share."""

from __future__ import annotations

import argparse
from typing import NoReturn

from rewrite.cli.commands import (
    run_apply,
    run_export,
    run_plan,
    run_profile,
    run_rules_check,
    run_rules_list,
    run_train,
)
from rewrite.cli.options import (
    DEFAULT_INPUT,
    DEFAULT_TOLERANCE,
    UsageError,
    parse_count,
    parse_formats,
    parse_input_shape,
    parse_model_arg,
    parse_percent,
    parse_seconds,
)
from rewrite.report import FORMATS


class Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line and exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> Parser:
    parser = Parser(prog="rewrite", description="torch.fx model surgery: slim-neck rewrites and their cost.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model, rules, importing, report = _model_options(), _rule_options(), _import_option(), _report_options()
    _add_plan(commands, [model, rules, importing, report])
    _add_apply(commands, [model, rules, importing])
    _add_export(commands, [model, importing])
    profile = commands.add_parser("profile", parents=[model, report], help="params / FLOPs / MACs per stage")
    profile.set_defaults(run=run_profile)
    _add_train(commands)
    rule_commands = commands.add_parser("rules", help="list built-in rule sets, or check a rule file")
    rule_actions = rule_commands.add_subparsers(dest="action", required=True, metavar="ACTION")
    rule_actions.add_parser("list", help="the built-in rule sets").set_defaults(run=run_rules_list)
    check = rule_actions.add_parser("check", parents=[importing], help="validate a rule file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=run_rules_check)
    return parser


# The options several commands share, as parent parsers


def _model_options() -> Parser:
    model = Parser(add_help=False)
    model.add_argument(
        "model",
        metavar="MODEL",
        help="zoo name (yolov5n … yolov5x), package.module:callable or file.py:callable"
        " (export: also a folder written by apply)",
    )
    model.add_argument(
        "--model-arg",
        action="append",
        default=[],
        type=parse_model_arg,
        metavar="KEY=VALUE",
        help="keyword argument for the model's callable (repeatable); 3, 0.5, true, none are parsed",
    )
    model.add_argument(
        "--input",
        type=parse_input_shape,  # raises InputSpecError: exit code 2 before anything is loaded
        default=DEFAULT_INPUT,
        metavar="SHAPE",
        help=f"shape of the one input tensor, comma-separated (default {DEFAULT_INPUT})",
    )
    model.add_argument(
        "--device",
        choices=("cpu", "meta"),
        default="cpu",
        help="where to build the model; meta allocates no weights (default cpu)",
    )
    model.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return model


def _rule_options() -> Parser:
    rules = Parser(add_help=False)
    rules.add_argument("--rules", required=True, metavar="RULES", help="built-in rule set name or TOML file")
    rules.add_argument(
        "--scope", metavar="S", help="stage name, module path or glob; several comma-separated"
    )
    rules.add_argument(
        "--allow-frozen",
        action="store_true",
        help="rewrite sites that only a traced graph can express even where that forward runs other code in"
        " train than in eval mode (the report says which code paths were frozen)",
    )
    return rules


def _import_option() -> Parser:
    importing = Parser(add_help=False)
    importing.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import a module (pkg.mod) or file (path/x.py) first, for the builders it registers (repeatable)",
    )
    return importing


def _report_options() -> Parser:
    report = Parser(add_help=False)
    report.add_argument(
        "--format",
        type=parse_formats,
        default=("text",),
        metavar="FORMAT",
        help=f"report format: {', '.join(FORMATS)} (default text); several, comma-separated, write"
        " FOLDER/report.EXT each into an --output folder from one run",
    )
    report.add_argument(
        "--output",
        metavar="FILE",
        help="write the report to FILE instead of stdout (a folder, or a path ending in /: FOLDER/report.EXT)",
    )
    return report


# The commands


def _add_plan(commands: argparse._SubParsersAction, parents: list[Parser]) -> None:
    plan = commands.add_parser("plan", parents=parents, help="dry run: what the rules would change")
    gates = plan.add_argument_group(
        "gates (exit code 1 when one fails; they apply to the figures after the rewrite)"
    )
    gates.add_argument(
        "--fail-on-no-match", action="store_true", help="fail when a rule matches nothing in scope"
    )
    gates.add_argument("--max-params", type=parse_count, metavar="N", help="at most N params, e.g. 40M")
    gates.add_argument("--max-flops", type=parse_count, metavar="N", help="at most N FLOPs, e.g. 100G")
    for what in ("params", "flops"):
        gates.add_argument(
            f"--min-{what}-reduction",
            type=parse_percent,
            metavar="PCT",
            help=f"at least PCT %% fewer {'FLOPs' if what == 'flops' else what}, e.g. 10",
        )
    plan.set_defaults(run=run_plan)


def _add_apply(commands: argparse._SubParsersAction, parents: list[Parser]) -> None:
    apply = commands.add_parser(
        "apply",
        parents=parents,
        help="write the rewritten model: recipe, weights and report",
    )
    apply.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder for recipe.json, weights.safetensors and plan.json (rewrite.load reads it back)",
    )
    apply.set_defaults(run=run_apply)


def _add_export(commands: argparse._SubParsersAction, parents: list[Parser]) -> None:
    export = commands.add_parser(
        "export",
        parents=parents,
        help="fold and export to ONNX, checked against PyTorch with ONNX Runtime",
    )
    export.add_argument(
        "--rules", metavar="RULES", help="rewrite with these rules first (default: export the model as it is)"
    )
    export.add_argument("--scope", metavar="S", help="as for plan")
    export.add_argument("--allow-frozen", action="store_true", help="as for plan")
    export.add_argument(
        "--output", required=True, metavar="FILE", help="the .onnx file (a folder: FOLDER/model.onnx)"
    )
    export.add_argument(
        "--trust-model-code",
        action="store_true",
        help="with a folder whose recipe names code (package.module:callable, file.py:callable): import and run"
        " it to build the model (by default only the zoo's models are built from a folder)",
    )
    export.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="leave the batch size free (checked at 1x and 2x --input)",
    )
    export.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        metavar="REL",
        help=f"exit code 1 when ONNX Runtime differs from PyTorch by more (default {DEFAULT_TOLERANCE:g})",
    )
    export.set_defaults(run=run_export)


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="rewrite a detector and train it in ultralytics' trainer (the ultralytics extra)",
        description="Rewrite an ultralytics detector and train it with ultralytics' own trainer; from a trained "
        ".pt checkpoint, a fine-tune (rewrite.integrations.ultralytics.train).",
    )
    train.add_argument(
        "model", metavar="MODEL", help="a trained .pt checkpoint, or an ultralytics model YAML"
    )
    train.add_argument("--rules", required=True, metavar="RULES", help="built-in rule set name or TOML file")
    train.add_argument("--scope", metavar="S", help="as for plan")
    train.add_argument(
        "--data", required=True, metavar="D.yaml", help="the dataset YAML, as ultralytics takes it"
    )
    train.add_argument("--epochs", required=True, type=int, metavar="K")
    train.add_argument(
        "--warm-start",
        nargs="?",
        const=True,
        default=False,
        type=parse_seconds,
        metavar="SECONDS",
        help="first teach the new blocks what the trained ones computed, on the training images, for SECONDS "
        "(alone: the default budget)",
    )
    train.add_argument(
        "options",
        nargs="*",
        type=parse_model_arg,
        metavar="KEY=VALUE",
        help="more arguments for ultralytics' train (imgsz=320 batch=32 device=0 lr0=0.001 ...)",
    )
    train.set_defaults(run=run_train)
