"""Where the ``rewrite`` command's reports and files go: stdout, files written all or none, the CI step summary;
progress on stderr."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rewrite.cli.options import UsageError
from rewrite.files import write_atomically

# A report's file name when --output names a folder.
_REPORT_SUFFIXES = {"text": "txt", "markdown": "md", "json": "json", "html": "html"}


def progress(args: argparse.Namespace) -> Callable[[str], None]:
    """A progress printer for stderr (stdout carries only the report), or a silent one under ``--quiet``."""
    if args.quiet:
        return lambda message: None
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:5.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def report_paths(formats: Sequence[str], output: str | None) -> dict[str, Path | None]:
    """Where each format's report goes: ``None`` for stdout, else the file ``output`` or FOLDER/report.EXT.

    Checked before any work is done: several formats need a folder, since stdout or one file takes one report.
    """
    if len(formats) > 1 and (output is None or not names_a_folder(output)):
        raise UsageError(
            f"--format {','.join(formats)} writes one report per format: --output must name a folder (end it "
            "with /), which gets report.EXT for each"
        )
    if output is None:
        return {formats[0]: None}
    if not names_a_folder(output):
        return {formats[0]: Path(output)}
    return {fmt: Path(output) / f"report.{_REPORT_SUFFIXES[fmt]}" for fmt in formats}


def write_reports(
    rendered: Callable[[str], str], destinations: dict[str, Path | None], say: Callable[[str], None]
) -> None:
    """Each report on stdout or in its file (all files or none), then the markdown one in the step summary."""
    files = {path: rendered(fmt) for fmt, path in destinations.items() if path is not None}
    if not files:
        sys.stdout.write(rendered(next(iter(destinations))))
    else:
        write(next(iter(files)), files)
        for path in files:
            say(f"wrote {path}")
    _append_step_summary(lambda: rendered("markdown"))


def names_a_folder(output: str) -> bool:
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


def output_folder(output: str) -> Path:
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output {folder}: cannot write there: it is a file, and apply writes a folder")
    return folder


def write(shown: Path, files: dict[Path, Any]) -> None:
    """All of ``files`` or none of them (see :func:`rewrite.files.write_atomically`); errors name ``shown``."""
    try:
        write_atomically(files)
    except OSError as error:
        raise cannot_write(shown, error) from error


def cannot_write(path: Path, error: OSError) -> UsageError:
    """An ``--output`` that cannot be written (a folder for a file, a file for a folder, no permission)."""
    return UsageError(f"--output {path}: cannot write there: {error.strerror or error}")


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
