"""What each ``rewrite`` command does, once its options are parsed: ``plan``, ``apply``, ``export``, ``profile``,
``train``, ``rules list`` / ``check``. Each returns its exit code; stdout carries only its report."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewrite.cli.options import UsageError
from rewrite.cli.output import (
    cannot_write,
    names_a_folder,
    output_folder,
    progress,
    report_paths,
    write,
    write_reports,
)
from rewrite.errors import InputSpecError, NoMatchWarning, RewriteError
from rewrite.execution import physical_memory as _physical_memory
from rewrite.gates import check_gates
from rewrite.model_spec import build_model, import_target, model_factory
from rewrite.report import render, render_profile

if TYPE_CHECKING:  # torch is imported by the commands that need it: --help and usage errors answer at once
    import torch
    from torch import nn

    from rewrite.planner import Plan


def run_plan(args: argparse.Namespace) -> int:
    destinations = report_paths(args.format, args.output)
    say = progress(args)
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
    write_reports(lambda fmt: render(result, fmt, gates=gates, gate_label=_option), destinations, say)
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


def run_apply(args: argparse.Namespace) -> int:
    from rewrite.serialization import recipe_files

    say = progress(args)
    result = _make_plan(args, say)
    say("applying")
    rewritten = result.apply()
    folder = output_folder(args.output)
    files = recipe_files(rewritten, result, model_spec=args.model, model_args=dict(args.model_arg))
    files["plan.json"] = render(result, "json").encode("utf-8")
    write(folder, {folder / name: content for name, content in files.items()})
    say(f"wrote {', '.join(str(folder / name) for name in files)}")
    sys.stdout.write(render(result, "text"))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from rewrite.export import export_onnx

    say = progress(args)
    if _is_recipe(args.model):
        from rewrite.serialization import load

        if args.rules:
            raise UsageError(f"{args.model} holds a rewrite already; leave out --rules")
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
    if names_a_folder(args.output):
        path = path / "model.onnx"
    say(f"folding and exporting to {path}")
    try:
        exported = export_onnx(model, (example,), path, dynamic_batch=args.dynamic_batch)
    except RewriteError as error:
        cause = error.__cause__
        if isinstance(cause, OSError):
            raise cannot_write(path, cause) from error
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


def run_profile(args: argparse.Namespace) -> int:
    from rewrite.profiler import profile

    destinations = report_paths(args.format, args.output)
    say = progress(args)
    model, example, name = _model_and_input(args, say)
    say("measuring")
    result = profile(model, (example,))

    def rendered(fmt: str) -> str:
        return render_profile(result, fmt, model_name=name, input_shapes=[tuple(example.shape)])

    write_reports(rendered, destinations, say)
    return 0


def run_train(args: argparse.Namespace) -> int:
    try:
        from rewrite.integrations.ultralytics import train
    except ModuleNotFoundError as error:
        if error.name != "ultralytics" and not (error.name or "").startswith("ultralytics."):
            raise
        raise UsageError(
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
        raise UsageError(str(error)) from None
    trainer = yolo.trainer
    print(f"checkpoint: {trainer.best if trainer.best.exists() else trainer.last}")
    if yolo.metrics is not None:
        box = yolo.metrics.box
        print(f"validation: mAP50 {box.map50:.4f}, mAP50-95 {box.map:.4f}")
    return 0


def run_rules_list(args: argparse.Namespace) -> int:
    from rewrite.rules import builtin_rule_sets, load_rules

    for name in builtin_rule_sets():
        rule_set = load_rules(name)
        print(f"{name}: {rule_set.description} ({_rule_count(rule_set)})")
    return 0


def run_rules_check(args: argparse.Namespace) -> int:
    from rewrite.rules import load_rules

    _import_all(args.imports)
    rule_set = load_rules(args.file)
    names = ", ".join(rule.name for rule in rule_set.rules)
    print(f"OK: {args.file}: rule set '{rule_set.name}', {_rule_count(rule_set)}: {names}")
    return 0


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


def _import_all(targets: Sequence[str]) -> None:
    """The ``--import`` modules or files, imported for what they register (builders), in order."""
    for target in targets:
        import_target(target, f"--import {target}", f"--import {target}: file")


def _rule_count(rule_set: Any) -> str:
    count = len(rule_set.rules)
    return f"{count} rule" + ("" if count == 1 else "s")
