"""The ``rewrite`` command: ``plan`` (a dry run), ``apply``, ``export``, ``profile``, ``train``, ``rules list`` /
``check``.

Examples::

    rewrite plan yolov5l --rules slim-neck --device meta --format markdown --min-flops-reduction 10
    rewrite plan models.py:build --model-arg nc=3 --rules my-rules.toml --format json --output plan.json
    rewrite apply yolov5n --rules slim-neck --output out/      # out/recipe.json, weights.safetensors, plan.json
    rewrite export yolov5n --rules slim-neck --output yolov5n-slim.onnx --dynamic-batch
    rewrite profile yolov5s --input 1,3,320,320
    rewrite train best.pt --rules slim-neck-v8 --data my.yaml --epochs 2 --warm-start 30 batch=32 device=0
    rewrite rules check my-rules.toml

Exit codes (``docs/cli.md`` has the table): 0 ok; 1 a gate, the shape check or the ONNX parity check failed;
2 bad input (model spec, rules, scope, input shape, option, an ``--output`` that cannot be written, a bad
recipe), printed as one line ``rewrite: error: ...`` on stderr; 3 an unexpected error, a bug in rewrite or in the
model's own code, with its traceback; 4 stdout could not take the report (a full disk); 141 stdout was closed
early (``| head``). stdout carries only the report; progress goes to stderr (``--quiet`` silences it). Every
file is written under a temporary name and renamed into place once complete. With ``GITHUB_STEP_SUMMARY`` set,
``plan`` and ``profile`` also append their markdown report to that file.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rewrite.errors import InputSpecError, NoMatchWarning, RewriteError
from rewrite.execution import physical_memory as _physical_memory
from rewrite.files import write_atomically
from rewrite.gates import check_gates
from rewrite.model_spec import build_model, import_target, model_factory
from rewrite.report import FORMATS, render, render_profile

if TYPE_CHECKING:  # torch is imported by the commands that need it: --help and usage errors answer at once
    import torch
    from torch import nn

    from rewrite.planner import Plan

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BROKEN_PIPE",
    "EXIT_GATE_FAILED",
    "EXIT_INTERNAL_ERROR",
    "EXIT_OK",
    "EXIT_OUTPUT_FAILED",
    "main",
]

DEFAULT_INPUT = "1,3,640,640"
DEFAULT_TOLERANCE = 1e-4
# A report's file name when --output names a folder.
_REPORT_SUFFIXES = {"text": "txt", "markdown": "md", "json": "json", "html": "html"}

# Exit codes, one per outcome that CI may want to tell apart (the table is in docs/cli.md).
EXIT_OK = 0
EXIT_GATE_FAILED = 1  # a gate or the shape check failed; the report was written
EXIT_BAD_INPUT = 2  # one line "rewrite: error: ..."
EXIT_INTERNAL_ERROR = 3  # a surprise: a bug in rewrite or in the model's code; traceback kept
EXIT_OUTPUT_FAILED = 4  # stdout could not take the report (a full disk, an I/O error)
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # stdout closed early (`| head`): what a shell shows for SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    stdout = sys.stdout
    sys.stdout = _GuardedStdout(stdout)
    try:
        code = _main(argv)
        sys.stdout.flush()  # the report is complete only once it left the buffer
        return code
    except _StdoutFailed as failure:
        # Whatever is still buffered must not reach the real stdout at exit (Python would complain again).
        _silence(stdout)
        if isinstance(failure.error, BrokenPipeError):
            return EXIT_BROKEN_PIPE  # the reader went away on purpose (`| head`): nothing to say
        reason = failure.error.strerror or failure.error
        print(f"rewrite: error: cannot write the report to stdout: {reason}", file=sys.stderr)
        return EXIT_OUTPUT_FAILED
    finally:
        sys.stdout = stdout


def _main(argv: Sequence[str] | None) -> int:
    parser = _build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            if args.command != "train":
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            # argparse hands a positional list only the strings before the first option: the rest come here.
            args.options += [_train_option(text) for text in unknown]
        if args.command in ("apply", "export") and args.device == "meta":
            raise _UsageError(
                f"{args.command} needs real weights; use --device cpu (meta builds the model without them)"
            )
        return args.run(args)
    except (_UsageError, RewriteError) as error:
        print(f"rewrite: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _StdoutFailed:
        raise
    except Exception as error:  # noqa: BLE001 - the one place that turns any surprise into exit code 3
        # A bug, ours or in the model's code: the traceback is what a bug report needs; the last line is for CI.
        traceback.print_exc()
        detail = " ".join(str(error).split()) or "(no message)"
        print(
            f"rewrite: internal error: {type(error).__name__}: {detail} (exit code {EXIT_INTERNAL_ERROR}: a bug in "
            "rewrite or in the model's code; the traceback above says where)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


class _StdoutFailed(Exception):
    """Writing the report to stdout failed: ``error`` says why (a closed pipe, a full disk)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _GuardedStdout:
    """stdout, except that a failed write says it came from stdout, so it is not mistaken for a bug."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            raise _StdoutFailed(error) from error

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            raise _StdoutFailed(error) from error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _silence(stdout: Any) -> None:
    """Point file descriptor 1 at the null device, as Python's docs advise after a broken pipe."""
    try:
        descriptor = stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture): nothing is flushed to it at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


# Parsing


class _UsageError(Exception):
    """A command line that argparse (or an option check) turned down."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line and exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _build_parser() -> _Parser:
    parser = _Parser(prog="rewrite", description="torch.fx model surgery: slim-neck rewrites and their cost.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = _Parser(add_help=False)
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
        type=_parse_model_arg,
        metavar="KEY=VALUE",
        help="keyword argument for the model's callable (repeatable); 3, 0.5, true, none are parsed",
    )
    model.add_argument(
        "--input",
        type=_parse_input_shape,  # raises InputSpecError: exit code 2 before anything is loaded
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

    rules = _Parser(add_help=False)
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
    importing = _Parser(add_help=False)
    importing.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import a module (pkg.mod) or file (path/x.py) first, for the builders it registers (repeatable)",
    )

    report = _Parser(add_help=False)
    report.add_argument(
        "--format",
        type=_parse_formats,
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

    plan = commands.add_parser(
        "plan", parents=[model, rules, importing, report], help="dry run: what the rules would change"
    )
    gates = plan.add_argument_group(
        "gates (exit code 1 when one fails; they apply to the figures after the rewrite)"
    )
    gates.add_argument(
        "--fail-on-no-match", action="store_true", help="fail when a rule matches nothing in scope"
    )
    gates.add_argument("--max-params", type=_parse_count, metavar="N", help="at most N params, e.g. 40M")
    gates.add_argument("--max-flops", type=_parse_count, metavar="N", help="at most N FLOPs, e.g. 100G")
    for what in ("params", "flops"):
        gates.add_argument(
            f"--min-{what}-reduction",
            type=_parse_percent,
            metavar="PCT",
            help=f"at least PCT %% fewer {'FLOPs' if what == 'flops' else what}, e.g. 10",
        )
    plan.set_defaults(run=_run_plan)

    apply = commands.add_parser(
        "apply",
        parents=[model, rules, importing],
        help="write the rewritten model: recipe, weights and report",
    )
    apply.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder for recipe.json, weights.safetensors and plan.json (rewrite.load reads it back)",
    )
    apply.set_defaults(run=_run_apply)

    export = commands.add_parser(
        "export",
        parents=[model, importing],
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
    export.set_defaults(run=_run_export)

    profile = commands.add_parser("profile", parents=[model, report], help="params / FLOPs / MACs per stage")
    profile.set_defaults(run=_run_profile)

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
        type=_parse_seconds,
        metavar="SECONDS",
        help="first teach the new blocks what the trained ones computed, on the training images, for SECONDS "
        "(alone: the default budget)",
    )
    train.add_argument(
        "options",
        nargs="*",
        type=_parse_model_arg,
        metavar="KEY=VALUE",
        help="more arguments for ultralytics' train (imgsz=320 batch=32 device=0 lr0=0.001 ...)",
    )
    train.set_defaults(run=_run_train)

    rule_commands = commands.add_parser("rules", help="list built-in rule sets, or check a rule file")
    rule_actions = rule_commands.add_subparsers(dest="action", required=True, metavar="ACTION")
    rule_actions.add_parser("list", help="the built-in rule sets").set_defaults(run=_run_rules_list)
    check = rule_actions.add_parser("check", parents=[importing], help="validate a rule file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=_run_rules_check)
    return parser


def _parse_input_shape(text: str) -> tuple[int, ...]:
    """The ``--input`` shape: comma-separated positive integers.

    >>> _parse_input_shape("1,3,640,640")
    (1, 3, 640, 640)
    >>> _parse_input_shape("1,3,x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    rewrite.errors.InputSpecError: --input '1,3,x': expected comma-separated positive integers such as ...
    """
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
        raise InputSpecError(
            f"--input {text!r}: expected comma-separated positive integers such as {DEFAULT_INPUT}"
        )
    shape = tuple(int(part) for part in parts)
    # torch counts elements in 64-bit integers; a larger tensor cannot even be described on meta.
    if math.prod(shape) > _MAX_ELEMENTS:
        raise InputSpecError(
            f"--input {text!r}: {math.prod(shape):.3g} elements, more than a tensor can hold (at most "
            f"{_MAX_ELEMENTS:.3g}); use a shape such as {DEFAULT_INPUT}"
        )
    return shape


_MAX_ELEMENTS = 2**63 - 1


def _parse_model_arg(text: str) -> tuple[str, object]:
    """A ``--model-arg KEY=VALUE``; the value becomes an int, float, bool or None when it looks like one.

    >>> [_parse_model_arg(t) for t in ("nc=3", "width=0.5", "pretrained=false", "cfg=None", "name=v5")]
    [('nc', 3), ('width', 0.5), ('pretrained', False), ('cfg', None), ('name', 'v5')]
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a Python identifier, got {text!r}")
    return key.strip(), _literal(value)


def _literal(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        # "nan" and "inf" stay text: nobody means them as numbers here.
        if kind is int or math.isfinite(value):
            return value
    return text


_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _parse_formats(text: str) -> tuple[str, ...]:
    """One report format, or several separated by commas (each written once, in the order given).

    >>> _parse_formats("html"), _parse_formats("markdown, html,json,html")
    (('html',), ('markdown', 'html', 'json'))
    >>> _parse_formats("pdf")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: unknown report format 'pdf'; expected text, markdown, json or html
    """
    formats = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    for fmt in formats:
        if fmt not in FORMATS:
            raise argparse.ArgumentTypeError(
                f"unknown report format {fmt!r}; expected {', '.join(FORMATS[:-1])} or {FORMATS[-1]}"
            )
    return formats


def _parse_count(text: str) -> int:
    """A params or FLOPs threshold, with an optional K / M / G / T suffix (powers of 1000).

    >>> _parse_count("100G"), _parse_count("46.5M"), _parse_count("1_000")
    (100000000000, 46500000, 1000)
    """
    match = re.fullmatch(
        r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)\s*", text.replace("_", "").replace(",", ""), re.IGNORECASE
    )
    value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()] if match else math.nan
    if not math.isfinite(value):  # not a count, or too many digits for a float
        raise argparse.ArgumentTypeError(f"expected a count such as 40M or 100G, got {text!r}")
    return round(value)


def _train_option(text: str) -> tuple[str, object]:
    """A ``rewrite train`` KEY=VALUE for ultralytics, or a usage error (an unknown option, say)."""
    try:
        return _parse_model_arg(text)
    except argparse.ArgumentTypeError as error:
        raise _UsageError(
            f"rewrite train: unrecognized argument {text!r}: {error} (see 'rewrite train --help')"
        )


def _parse_seconds(text: str) -> float:
    """A ``--warm-start`` budget: a positive number of seconds.

    >>> _parse_seconds("45"), _parse_seconds("2.5")
    (45.0, 2.5)
    """
    value = _literal(text)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds such as 30, got {text!r}")
    return float(value)


def _parse_percent(text: str) -> float:
    """A reduction threshold in percent, from 0 to 100 (more could never pass); a trailing ``%`` is allowed.

    >>> _parse_percent("10"), _parse_percent("12.5%")
    (10.0, 12.5)
    >>> _parse_percent("150")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a percentage from 0 to 100 such as 10 or 12.5, got '150'
    """
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"expected a percentage from 0 to 100 such as 10 or 12.5, got {text!r}"
        )
    return value


def _model_and_input(
    args: argparse.Namespace, say: Callable[[str], None], factory: Callable[..., Any] | None = None
) -> tuple[nn.Module, torch.Tensor, str]:
    """The model, its example input and the name that reports give it, from the options shared by commands.

    ``factory`` is the model's callable when the caller has already imported it (see :func:`_make_plan`).
    """
    kwargs = dict(args.model_arg)
    name = args.model + (f"({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})" if kwargs else "")
    say(f"building {name} on {args.device}")
    model = build_model(args.model, factory or model_factory(args.model), kwargs, args.device)
    return model, _example_input(args.input, args.device), name


def _example_input(shape: tuple[int, ...], device: str) -> torch.Tensor:
    """The ``--input`` tensor: seeded images in [0, 1] (repeatable, and what a detector is fed), or on meta
    a tensor without storage."""
    import torch

    shown = ",".join(map(str, shape))
    if device == "meta":
        return torch.empty(shape, device="meta")
    size = math.prod(shape) * torch.empty((), dtype=torch.float32).element_size()
    memory = _physical_memory()
    # Checked before allocating: with overcommit the allocation may succeed and the kernel kill us on first touch.
    if memory is not None and size > memory:
        raise InputSpecError(
            f"--input {shown}: the example input alone needs {size / 1e9:,.1f} GB, more than this machine's "
            f"{memory / 1e9:,.1f} GB of memory; use a smaller shape, or --device meta (which allocates nothing)"
        )
    try:
        return torch.rand(shape, generator=torch.Generator().manual_seed(0))
    except (RuntimeError, MemoryError) as error:  # torch's allocator says "can't allocate memory"
        detail = " ".join(str(error).split())[:200]
        raise InputSpecError(
            f"--input {shown}: cannot make the example input on {device} ({size / 1e9:,.1f} GB): {detail}; "
            "use a smaller shape, or --device meta"
        ) from None


def _is_recipe(model: str) -> bool:
    """Whether MODEL names a folder written by ``rewrite apply`` / ``rewrite.save``."""
    from rewrite.serialization import RECIPE_FILE

    return (Path(model) / RECIPE_FILE).is_file()


# Commands


def _run_plan(args: argparse.Namespace) -> int:
    destinations = _report_paths(args.format, args.output)
    say = _progress(args)
    result = _make_plan(args, say)
    gates = check_gates(
        result,
        fail_on_no_match=args.fail_on_no_match,
        max_params=args.max_params,
        max_flops=args.max_flops,
        min_params_reduction=args.min_params_reduction,
        min_flops_reduction=args.min_flops_reduction,
    )
    # The report names each gate by the option that set it.
    _write_reports(lambda fmt: render(result, fmt, gates=gates, gate_label=_option), destinations, say)
    failed = [gate for gate in gates if not gate.passed]
    if result.nothing_rewritten:
        print(f"rewrite: {result.nothing_rewritten}", file=sys.stderr)
    # Also on stderr: the CI log says why the step failed even when the report went to a file.
    for gate in failed:
        print(f"rewrite: gate failed: {_option(gate.gate)}: {gate.detail}", file=sys.stderr)
    if not result.shape_check.passed:
        print(f"rewrite: shape check failed: {result.shape_check.detail}", file=sys.stderr)
    return 1 if failed or not result.shape_check.passed else 0


def _option(gate: str) -> str:
    """The command-line option that sets ``gate`` (a gate's name is its option without the dashes)."""
    return f"--{gate}"


def _run_apply(args: argparse.Namespace) -> int:
    from rewrite.serialization import recipe_files

    say = _progress(args)
    result = _make_plan(args, say)
    say("applying")
    rewritten = result.apply()
    folder = _output_folder(args.output)
    files = recipe_files(rewritten, result, model_spec=args.model, model_args=dict(args.model_arg))
    files["plan.json"] = render(result, "json").encode("utf-8")
    _write(folder, {folder / name: content for name, content in files.items()})
    say(f"wrote {', '.join(str(folder / name) for name in files)}")
    sys.stdout.write(render(result, "text"))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from rewrite.export import export_onnx

    say = _progress(args)
    if _is_recipe(args.model):
        from rewrite.serialization import load

        if args.rules:
            raise _UsageError(f"{args.model} holds a rewrite already; leave out --rules")
        say(f"loading the rewrite saved in {args.model}")
        model = load(args.model, trust_model_code=args.trust_model_code)
    elif args.rules:
        result = _make_plan(args, say)
        say("applying")
        model = result.apply()
    else:
        model, _, _ = _model_and_input(args, say)
    example = _example_input(args.input, args.device)
    path = Path(args.output)
    if _names_a_folder(args.output):
        path = path / "model.onnx"
    say(f"folding and exporting to {path}")
    try:
        exported = export_onnx(model, (example,), path, dynamic_batch=args.dynamic_batch)
    except RewriteError as error:
        cause = error.__cause__
        if isinstance(cause, OSError):
            raise _cannot_write(path, cause) from error
        raise
    size = path.stat().st_size / 1e6
    if not exported.differences:
        print(f"wrote {path} ({size:.1f} MB); not checked: onnxruntime is not installed")
        return 0
    figures = ", ".join(f"batch {batch}: {value:.2e}" for batch, value in exported.differences.items())
    print(f"wrote {path} ({size:.1f} MB); largest relative difference from PyTorch: {figures}")
    if exported.max_difference > args.tolerance:
        print(
            f"rewrite: ONNX parity check failed: {exported.max_difference:.2e} > --tolerance {args.tolerance:g}",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_profile(args: argparse.Namespace) -> int:
    from rewrite.profiler import profile

    destinations = _report_paths(args.format, args.output)
    say = _progress(args)
    model, example, name = _model_and_input(args, say)
    say("measuring")
    result = profile(model, (example,))

    def rendered(fmt: str) -> str:
        return render_profile(result, fmt, model_name=name, input_shapes=[tuple(example.shape)])

    _write_reports(rendered, destinations, say)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    try:
        from rewrite.integrations.ultralytics import train
    except ModuleNotFoundError as error:
        if error.name != "ultralytics" and not (error.name or "").startswith("ultralytics."):
            raise
        raise _UsageError(
            "rewrite train needs the ultralytics extra: pip install 'fx-rewrite[ultralytics]'"
        ) from None
    try:
        yolo = train(
            model=args.model,
            rules=args.rules,
            scope=args.scope,
            warm_start=args.warm_start,
            data=args.data,
            epochs=args.epochs,
            **dict(args.options),
        )
    except FileNotFoundError as error:  # ultralytics' word for a model or dataset that is not there
        raise _UsageError(str(error)) from None
    trainer = yolo.trainer
    print(f"checkpoint: {trainer.best if trainer.best.exists() else trainer.last}")
    if yolo.metrics is not None:
        box = yolo.metrics.box
        print(f"validation: mAP50 {box.map50:.4f}, mAP50-95 {box.map:.4f}")
    return 0


def _run_rules_list(args: argparse.Namespace) -> int:
    from rewrite.rules import builtin_rule_sets, load_rules

    for name in builtin_rule_sets():
        rule_set = load_rules(name)
        print(f"{name}: {rule_set.description} ({_rule_count(rule_set)})")
    return 0


def _run_rules_check(args: argparse.Namespace) -> int:
    from rewrite.rules import load_rules

    _import_all(args.imports)
    rule_set = load_rules(args.file)
    names = ", ".join(rule.name for rule in rule_set.rules)
    print(f"OK: {args.file}: rule set '{rule_set.name}', {_rule_count(rule_set)}: {names}")
    return 0


def _import_all(targets: Sequence[str]) -> None:
    """The ``--import`` modules or files, imported for what they register (builders), in order."""
    for target in targets:
        import_target(target, f"--import {target}", f"--import {target}: file")


def _rule_count(rule_set: Any) -> str:
    count = len(rule_set.rules)
    return f"{count} rule" + ("" if count == 1 else "s")


def _make_plan(args: argparse.Namespace, say: Callable[[str], None]) -> Plan:
    """The plan that the options shared by ``plan`` and ``apply`` ask for."""
    from rewrite.planner import plan
    from rewrite.rules import load_rules

    # Import the model's code (and --import's) first: builders it registers must be known when rules load.
    _import_all(args.imports)
    factory = model_factory(args.model)
    rule_set = load_rules(args.rules)  # a bad rule file fails before any model is built
    model, example, name = _model_and_input(args, say, factory)
    with warnings.catch_warnings():
        # A rule that matched nothing is in the report's warnings; Python's own warning line would repeat it.
        warnings.simplefilter("ignore", NoMatchWarning)
        result = plan(
            model,
            rule_set,
            (example,),
            scope=args.scope,
            model_name=name,
            allow_frozen=args.allow_frozen,
            progress=say,
        )
    for message in result.warnings:
        say(f"warning: {message}")
    return result


# Output


def _progress(args: argparse.Namespace) -> Callable[[str], None]:
    """A progress printer for stderr (stdout carries only the report), or a silent one under ``--quiet``."""
    if args.quiet:
        return lambda message: None
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:5.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def _report_paths(formats: Sequence[str], output: str | None) -> dict[str, Path | None]:
    """Where each format's report goes: ``None`` for stdout, else the file ``output`` or FOLDER/report.EXT.

    Checked before any work is done: several formats need a folder, since stdout or one file takes one report.
    """
    if len(formats) > 1 and (output is None or not _names_a_folder(output)):
        raise _UsageError(
            f"--format {','.join(formats)} writes one report per format: --output must name a folder (end it "
            "with /), which gets report.EXT for each"
        )
    if output is None:
        return {formats[0]: None}
    if not _names_a_folder(output):
        return {formats[0]: Path(output)}
    return {fmt: Path(output) / f"report.{_REPORT_SUFFIXES[fmt]}" for fmt in formats}


def _write_reports(
    rendered: Callable[[str], str], destinations: dict[str, Path | None], say: Callable[[str], None]
) -> None:
    """Each report on stdout or in its file (all files or none), then the markdown one in the step summary."""
    files = {path: rendered(fmt) for fmt, path in destinations.items() if path is not None}
    if not files:
        sys.stdout.write(rendered(next(iter(destinations))))
    else:
        _write(next(iter(files)), files)
        for path in files:
            say(f"wrote {path}")
    _append_step_summary(lambda: rendered("markdown"))


def _names_a_folder(output: str) -> bool:
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


def _output_folder(output: str) -> Path:
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise _UsageError(f"--output {folder}: cannot write there: it is a file, and apply writes a folder")
    return folder


def _write(shown: Path, files: dict[Path, Any]) -> None:
    """All of ``files`` or none of them (see :func:`rewrite.files.write_atomically`); errors name ``shown``."""
    try:
        write_atomically(files)
    except OSError as error:
        raise _cannot_write(shown, error) from error


def _cannot_write(path: Path, error: OSError) -> _UsageError:
    """An ``--output`` that cannot be written (a folder for a file, a file for a folder, no permission)."""
    return _UsageError(f"--output {path}: cannot write there: {error.strerror or error}")


def _append_step_summary(markdown: Callable[[], str]) -> None:
    """GitHub Actions shows the file named by ``GITHUB_STEP_SUMMARY`` on the run's page; steps append."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if not summary:
        return
    try:
        with open(summary, "a", encoding="utf-8") as file:
            file.write(markdown() + "\n")
    except OSError as error:
        # The summary is a courtesy: the report itself is out, so the gates still decide the exit code.
        print(
            f"rewrite: warning: GITHUB_STEP_SUMMARY={summary}: cannot append the report: "
            f"{error.strerror or error}",
            file=sys.stderr,
        )
