"""The ``rewrite`` command's parser: its commands, their options, and the options they share.

Options are tables of ``add_argument``'s arguments: the groups several commands share become parent parsers,
and each command is its name, its function, the groups it takes and its own options.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

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


@dataclass(frozen=True)
class _Option:
    """One option as ``add_argument`` takes it: its flags (or a positional's name), then its settings."""

    flags: tuple[str, ...]
    settings: dict[str, Any]


def _option(*flags: str, **settings: Any) -> _Option:
    return _Option(flags, settings)


_RULES = _option("--rules", required=True, metavar="RULES", help="built-in rule set name or TOML file")
_SCOPE_AS_FOR_PLAN = _option("--scope", metavar="S", help="as for plan")

# The options several commands share, as parent parsers

_MODEL_OPTIONS = (
    _option(
        "model",
        metavar="MODEL",
        help="zoo name (yolov5n … yolov5x), package.module:callable or file.py:callable"
        " (export: also a folder written by apply)",
    ),
    _option(
        "--model-arg",
        action="append",
        default=[],
        type=parse_model_arg,
        metavar="KEY=VALUE",
        help="keyword argument for the model's callable (repeatable); 3, 0.5, true, none are parsed",
    ),
    _option(
        "--input",
        type=parse_input_shape,  # raises InputSpecError: exit code 2 before anything is loaded
        default=DEFAULT_INPUT,
        metavar="SHAPE",
        help=f"shape of the one input tensor, comma-separated (default {DEFAULT_INPUT})",
    ),
    _option(
        "--device",
        choices=("cpu", "meta"),
        default="cpu",
        help="where to build the model; meta allocates no weights (default cpu)",
    ),
    _option("-q", "--quiet", action="store_true", help="no progress lines on stderr"),
)
_RULE_OPTIONS = (
    _RULES,
    _option("--scope", metavar="S", help="stage name, module path or glob; several comma-separated"),
    _option(
        "--allow-frozen",
        action="store_true",
        help="rewrite sites that only a traced graph can express even where that forward runs other code in"
        " train than in eval mode (the report says which code paths were frozen)",
    ),
)
_IMPORT_OPTIONS = (
    _option(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import a module (pkg.mod) or file (path/x.py) first, for the builders it registers (repeatable)",
    ),
)
_REPORT_OPTIONS = (
    _option(
        "--format",
        type=parse_formats,
        default=("text",),
        metavar="FORMAT",
        help=f"report format: {', '.join(FORMATS)} (default text); several, comma-separated, write"
        " FOLDER/report.EXT each into an --output folder from one run",
    ),
    _option(
        "--output",
        metavar="FILE",
        help="write the report to FILE instead of stdout (a folder, or a path ending in /: FOLDER/report.EXT)",
    ),
)

# The commands' own options

_GATES_TITLE = "gates (exit code 1 when one fails; they apply to the figures after the rewrite)"
_GATES = (
    _option("--fail-on-no-match", action="store_true", help="fail when a rule matches nothing in scope"),
    _option("--max-params", type=parse_count, metavar="N", help="at most N params, e.g. 40M"),
    _option("--max-flops", type=parse_count, metavar="N", help="at most N FLOPs, e.g. 100G"),
    *(
        _option(
            f"--min-{what}-reduction",
            type=parse_percent,
            metavar="PCT",
            help=f"at least PCT %% fewer {'FLOPs' if what == 'flops' else what}, e.g. 10",
        )
        for what in ("params", "flops")
    ),
)
_APPLY_OPTIONS = (
    _option(
        "--output",
        required=True,
        metavar="DIR",
        help="folder for recipe.json, weights.safetensors and plan.json (rewrite.load reads it back)",
    ),
)
_EXPORT_OPTIONS = (
    _option(
        "--rules", metavar="RULES", help="rewrite with these rules first (default: export the model as it is)"
    ),
    _SCOPE_AS_FOR_PLAN,
    _option("--allow-frozen", action="store_true", help="as for plan"),
    _option("--output", required=True, metavar="FILE", help="the .onnx file (a folder: FOLDER/model.onnx)"),
    _option(
        "--trust-model-code",
        action="store_true",
        help="with a folder whose recipe names code (package.module:callable, file.py:callable): import and run"
        " it to build the model (by default only the zoo's models are built from a folder)",
    ),
    _option(
        "--dynamic-batch",
        action="store_true",
        help="leave the batch size free (checked at 1x and 2x --input)",
    ),
    _option(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        metavar="REL",
        help=f"exit code 1 when ONNX Runtime differs from PyTorch by more (default {DEFAULT_TOLERANCE:g})",
    ),
)
_TRAIN_DESCRIPTION = (
    "Rewrite an ultralytics detector and train it with ultralytics' own trainer; from a trained .pt checkpoint, a"
    " fine-tune (rewrite.integrations.ultralytics.train)."
)
_TRAIN_OPTIONS = (
    _option("model", metavar="MODEL", help="a trained .pt checkpoint, or an ultralytics model YAML"),
    _RULES,
    _SCOPE_AS_FOR_PLAN,
    _option("--data", required=True, metavar="D.yaml", help="the dataset YAML, as ultralytics takes it"),
    _option("--epochs", required=True, type=int, metavar="K"),
    _option(
        "--warm-start",
        nargs="?",
        const=True,
        default=False,
        type=parse_seconds,
        metavar="SECONDS",
        help="first teach the new blocks what the trained ones computed, on the training images, for SECONDS "
        "(alone: the default budget)",
    ),
    _option(
        "options",
        nargs="*",
        type=parse_model_arg,
        metavar="KEY=VALUE",
        help="more arguments for ultralytics' train (imgsz=320 batch=32 device=0 lr0=0.001 ...)",
    ),
)


# What ``rewrite --help`` (and ``rewrite rules --help``) says each command does
_SUMMARIES = {
    "plan": "dry run: what the rules would change",
    "apply": "write the rewritten model: recipe, weights and report",
    "export": "fold and export to ONNX, checked against PyTorch with ONNX Runtime",
    "profile": "params / FLOPs / MACs per stage",
    "train": "rewrite a detector and train it in ultralytics' trainer (the ultralytics extra)",
    "rules": "list built-in rule sets, or check a rule file",
    "list": "the built-in rule sets",
    "check": "validate a rule file",
}


def build_parser() -> Parser:
    parser = Parser(prog="rewrite", description="torch.fx model surgery: slim-neck rewrites and their cost.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = (_MODEL_OPTIONS, _RULE_OPTIONS, _IMPORT_OPTIONS, _REPORT_OPTIONS)
    model, rules, importing, report = map(_parent, shared)
    plan = _command(commands, "plan", run_plan, [model, rules, importing, report])
    _add(plan.add_argument_group(_GATES_TITLE), _GATES)
    _command(commands, "apply", run_apply, [model, rules, importing], _APPLY_OPTIONS)
    _command(commands, "export", run_export, [model, importing], _EXPORT_OPTIONS)
    _command(commands, "profile", run_profile, [model, report])
    _command(commands, "train", run_train, options=_TRAIN_OPTIONS, description=_TRAIN_DESCRIPTION)
    rule_commands = commands.add_parser("rules", help=_SUMMARIES["rules"])
    rule_actions = rule_commands.add_subparsers(dest="action", required=True, metavar="ACTION")
    _command(rule_actions, "list", run_rules_list)
    _command(rule_actions, "check", run_rules_check, [importing], [_option("file", metavar="FILE")])
    return parser


def _parent(options: Iterable[_Option]) -> Parser:
    """A parent parser of ``options``, for the commands that share them."""
    parent = Parser(add_help=False)
    _add(parent, options)
    return parent


def _command(
    commands: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    parents: Sequence[Parser] = (),
    options: Iterable[_Option] = (),
    description: str | None = None,
) -> Parser:
    """The command ``name``, which ``run`` carries out: the parents' options, then its own."""
    command = commands.add_parser(name, parents=parents, help=_SUMMARIES[name], description=description)
    _add(command, options)
    command.set_defaults(run=run)
    return command


def _add(target: argparse._ActionsContainer, options: Iterable[_Option]) -> None:
    for option in options:
        # A copy of each setting: a default list is the namespace's own value, fresh for every parser.
        target.add_argument(
            *option.flags, **{key: copy.copy(value) for key, value in option.settings.items()}
        )
