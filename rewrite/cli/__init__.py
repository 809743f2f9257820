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

import os
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from rewrite.cli.options import UsageError, train_option
from rewrite.cli.parser import build_parser
from rewrite.errors import RewriteError

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BROKEN_PIPE",
    "EXIT_GATE_FAILED",
    "EXIT_INTERNAL_ERROR",
    "EXIT_OK",
    "EXIT_OUTPUT_FAILED",
    "main",
]

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
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            if args.command != "train":
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            # argparse hands a positional list only the strings before the first option: the rest come here.
            args.options += [train_option(text) for text in unknown]
        if args.command in ("apply", "export") and args.device == "meta":
            raise UsageError(
                f"{args.command} needs real weights; use --device cpu (meta builds the model without them)"
            )
        return args.run(args)
    except (UsageError, RewriteError) as error:
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
