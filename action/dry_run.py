"""The two steps of the fx-rewrite GitHub Action (``action.yml``), as a script that runs anywhere.

``action.yml`` runs them on the runner; the test suite runs them in a fresh folder; so can you::

    python action/dry_run.py install   # torch from INPUT_TORCH_INDEX (if set), then fx-rewrite from this checkout
    python action/dry_run.py plan      # the dry run, in the working directory (the caller's repository)

Both use the interpreter that runs them (``pip`` installs into it) and the standard library only (``install``
runs before anything else is there). Their inputs are environment variables named as GitHub names an action's
inputs: ``INPUT_`` and the input's name in capitals, ``-`` as ``_`` (``INPUT_MIN_FLOPS_REDUCTION``); action.yml
passes each input through ``env``, never into the shell line. ``plan`` also needs ``REPORT_DIR``, the folder for
``report.md``, ``report.html`` and ``report.json``.

``plan`` exits with rewrite's own exit code (0 ok, 1 a gate or the shape check failed, 2 bad input, see
docs/cli.md) and writes the step's outputs to the file named by ``GITHUB_OUTPUT`` when that is set: the
reports' paths and the JSON report's totals (``params-before`` … ``flops-change-percent``). The markdown report
goes to the step summary, ``GITHUB_STEP_SUMMARY``, as rewrite does by itself.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]  # the action's own checkout: pyproject.toml, constraints.txt
GATES = ("max-params", "max-flops", "min-params-reduction", "min-flops-reduction")
FORMATS = {"markdown": "md", "html": "html", "json": "json"}


def main(argv: list[str]) -> int:
    steps = {"install": install, "plan": plan}
    if len(argv) != 1 or argv[0] not in steps:
        return _fail(f"usage: python {Path(__file__).name} install|plan", code=2)
    return steps[argv[0]]()


def install() -> int:
    """torch from the torch index first (CPU wheels by default in action.yml), then fx-rewrite, both pinned."""
    constraints = str(CHECKOUT / "constraints.txt")
    torch_index = _input("torch-index")
    if torch_index:
        # torch alone from that index: the CPU-only wheel of the pinned version (2.x.y+cpu satisfies ==2.x.y).
        code = _pip("install", "--index-url", torch_index, "-c", constraints, "torch")
        if code:
            return _fail(f"installing torch from {torch_index} failed (pip's exit code {code})", code=code)
    code = _pip("install", "-c", constraints, str(CHECKOUT))
    if code:
        return _fail(f"installing fx-rewrite from {CHECKOUT} failed (pip's exit code {code})", code=code)
    # An unrelated distribution named "rewrite" also installs an import package "rewrite": only one can be there.
    check = subprocess.run(
        [sys.executable, "-c", "import rewrite.cli"], check=False, capture_output=True, text=True
    )
    if check.returncode:
        return _fail(
            "fx-rewrite is installed but `import rewrite.cli` fails; is the unrelated `rewrite` distribution "
            f"installed too (`pip uninstall rewrite fx-rewrite`, then run again)? {check.stderr.strip()}",
            code=2,
        )
    return 0


def plan() -> int:
    """``rewrite plan`` on the caller's model: three reports from one run, the outputs, rewrite's exit code."""
    model = _input("model")
    if not model:
        return _fail(
            "the input 'model' is empty: name the model, e.g. models/det.py:build or yolov5s", code=2
        )
    if not os.environ.get("REPORT_DIR"):
        return _fail("REPORT_DIR is not set: name the folder for the reports", code=2)
    reports = Path(os.environ["REPORT_DIR"]).resolve()
    paths = {fmt: reports / f"report.{suffix}" for fmt, suffix in FORMATS.items()}
    for stale in paths.values():  # an earlier run's reports must not pass for this one's
        stale.unlink(missing_ok=True)
    command = [sys.executable, "-m", "rewrite", "plan", model, "--rules", _input("rules") or "slim-neck"]
    command += [
        "--device",
        _input("device") or "meta",
        "--format",
        ",".join(FORMATS),
        "--output",
        f"{reports}/",
    ]
    for option in ("scope", "input"):
        if _input(option):
            command += [f"--{option}", _input(option)]
    for name, option in (("model-args", "--model-arg"), ("import", "--import")):
        for value in _input(name).split():  # several, separated by spaces or newlines
            command += [option, value]
    if _input("fail-on-no-match").lower() == "true":
        command.append("--fail-on-no-match")
    for gate in GATES:
        if _input(gate):
            command += [f"--{gate}", _input(gate)]
    print("+ " + shlex.join(["rewrite", *command[3:]]), flush=True)  # as the user would type it
    code = subprocess.run(command, check=False).returncode
    if paths["json"].exists():
        _write_outputs(paths)
    return code


def _write_outputs(paths: dict[str, Path]) -> None:
    output = os.environ.get("GITHUB_OUTPUT")
    if not output:
        return
    totals = json.loads(paths["json"].read_text(encoding="utf-8"))["totals"]
    values = {f"report-{fmt}": str(path) for fmt, path in paths.items()}
    for figure in ("params", "flops"):
        delta = totals[figure]
        values |= {
            f"{figure}-before": delta["before"],
            f"{figure}-after": delta["after"],
            f"{figure}-change-percent": delta["percent"],
        }
    with open(output, "a", encoding="utf-8") as file:
        file.writelines(f"{name}={value}\n" for name, value in values.items())


def _input(name: str) -> str:
    return os.environ.get("INPUT_" + name.upper().replace("-", "_"), "").strip()


def _pip(*args: str) -> int:
    print("+ " + shlex.join(["pip", *args]), flush=True)
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False).returncode


def _fail(message: str, *, code: int) -> int:
    print(f"fx-rewrite action: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
