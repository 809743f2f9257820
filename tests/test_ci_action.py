"""The GitHub Action (``action.yml``) and the CI workflows: GitHub's own schemas, and the action's steps run for
real, as a detector project's CI would run them, in a folder that is not this repository.
"""

import inspect
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import check_jsonschema  # noqa: F401 - the test extra installs it; without it, say so here rather than below
import pytest
import yaml
from html_page import parse_html

from rewrite.gates import check_gates

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
WORKFLOWS = [
    ROOT / "examples" / "ci" / "slim-neck-dry-run.yml",
    ROOT / ".github" / "workflows" / "slim-neck-dry-run.yml",
]
# What GitHub checks out for `uses: OWNER/REPO@REF`, as far as installing the tool needs it.
CHECKOUT_FILES = ["pyproject.toml", "setup.cfg", "README.md", "constraints.txt", "rewrite", "rules", "action"]


def files_failing(schema: str, *files: Path) -> set[str]:
    """The files that check-jsonschema finds invalid under one of the schemas it ships: GitHub's, as published."""
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", f"vendor.{schema}", "-o", "json"]
    result = subprocess.run([*command, *map(str, files)], check=False, capture_output=True, text=True)
    failing = {Path(error["filename"]).name for error in json.loads(result.stdout).get("errors", [])}
    assert result.returncode == (1 if failing else 0), result.stderr
    return failing


def test_the_action_and_the_workflows_follow_githubs_schemas(tmp_path):
    # Beside each, a copy that breaks the schema, so the check is seen to bite: a composite step without its
    # shell, a job without runs-on.
    action = yaml.safe_load(ACTION.read_text())
    del next(step for step in action["runs"]["steps"] if "run" in step)["shell"]
    (tmp_path / "broken-action.yml").write_text(yaml.safe_dump(action))
    assert files_failing("github-actions", ACTION, tmp_path / "broken-action.yml") == {"broken-action.yml"}
    workflow = yaml.safe_load(WORKFLOWS[0].read_text())
    del workflow["jobs"]["slim-neck"]["runs-on"]
    (tmp_path / "broken-workflow.yml").write_text(yaml.safe_dump(workflow))
    assert files_failing("github-workflows", *WORKFLOWS, tmp_path / "broken-workflow.yml") == {
        "broken-workflow.yml"
    }


def test_the_action_takes_every_gate_and_hands_every_input_to_its_script():
    action = yaml.safe_load(ACTION.read_text())
    gates = {name.replace("_", "-") for name in inspect.signature(check_gates).parameters if name != "plan"}
    assert gates <= set(action["inputs"])
    handed = {
        name: value
        for step in action["runs"]["steps"]
        for name, value in step.get("env", {}).items()
        if name.startswith("INPUT_")
    }
    for name in set(action["inputs"]) - {"python-version", "working-directory", "report-name"}:
        assert handed["INPUT_" + name.upper().replace("-", "_")] == f"${{{{ inputs.{name} }}}}", name
    # Both workflows use the action on the example detector; only the copied one says where it comes from.
    for path, uses in zip(WORKFLOWS, ["OWNER/REPO@REF", "./"]):
        steps = yaml.safe_load(path.read_text())["jobs"]["slim-neck"]["steps"]
        detector = next(
            step for step in steps if step.get("with", {}).get("model") == "examples/ci/detector.py:build"
        )
        assert detector["uses"] == uses and detector["with"]["rules"] == "examples/ci/slim-neck-rules.toml"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """The action's install step, run from a copy of this repository into a fresh environment.

    The environment sees the test's own packages (torch is 5 GB: it is not installed again) through a .pth
    file, pip may use no index and builds in that environment; fx-rewrite itself is installed from the copy.
    Returns (its python, the caller's repository: the example detector and its rule file, nothing else).
    """
    root = tmp_path_factory.mktemp("ci")
    checkout = root / "actions" / "fx-rewrite"
    checkout.mkdir(parents=True)
    for name in CHECKOUT_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, checkout / name)
    caller = root / "detector-project"
    (caller / "models").mkdir(parents=True)
    shutil.copy2(ROOT / "examples" / "ci" / "detector.py", caller / "models" / "detector.py")
    shutil.copy2(ROOT / "examples" / "ci" / "slim-neck-rules.toml", caller / "slim-neck-rules.toml")

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = [path for path in site.getsitepackages() if Path(path).is_dir()]
    Path(purelib, "test-packages.pth").write_text("\n".join(outer) + "\n")
    result = step(python, "install", caller, INPUT_TORCH_INDEX="")
    assert result.returncode == 0, result.stdout + result.stderr
    return python, caller


def step(python: Path, name: str, cwd: Path, **inputs: str) -> subprocess.CompletedProcess:
    """One of the action's steps, with the environment a runner gives it: inputs, pip's settings, no PYTHONPATH."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "PIP_", "GITHUB_"))
    }
    # No index (the test runs offline), and build in this environment: "0" is how pip's environment spells
    # --no-build-isolation (isolation would fetch setuptools from an index).
    env |= {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    script = cwd.parent / "actions" / "fx-rewrite" / "action" / "dry_run.py"  # the copy, as GitHub runs it
    return subprocess.run(
        [python, script, name], check=False, cwd=cwd, env=env | inputs, capture_output=True, text=True
    )


def test_the_install_step_installs_fx_rewrite_from_the_checkout_into_the_fresh_environment(installed):
    python, caller = installed
    where = subprocess.run(
        [
            python,
            "-c",
            "import importlib.metadata as m, rewrite; print(rewrite.__file__, m.version('fx-rewrite'))",
        ],
        cwd=caller,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(python.parent.parent) and where[1] == "0.1.0"


def test_the_plan_step_writes_the_reports_the_outputs_and_the_summary_and_exits_with_the_gates_code(
    installed, tmp_path
):
    python, caller = installed
    github = {
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "GITHUB_OUTPUT": str(tmp_path / "output.txt"),
        "REPORT_DIR": str(tmp_path / "reports"),
    }
    inputs = {
        "INPUT_MODEL": "models/detector.py:build",
        "INPUT_MODEL_ARGS": "nc=3",
        "INPUT_RULES": "slim-neck-rules.toml",
        "INPUT_INPUT": "1,3,128,128",
        "INPUT_DEVICE": "meta",
        "INPUT_FAIL_ON_NO_MATCH": "true",
        "INPUT_MIN_FLOPS_REDUCTION": "10",
    }
    passed = step(python, "plan", caller, **github, **inputs)
    assert passed.returncode == 0, passed.stderr
    outputs = dict(line.split("=", 1) for line in (tmp_path / "output.txt").read_text().splitlines())
    report = json.loads(Path(outputs["report-json"]).read_text())
    assert report["model"] == "models/detector.py:build(nc=3)" and len(report["sites"]) == 4
    for figure in ("params", "flops"):
        delta = report["totals"][figure]
        assert [outputs[f"{figure}-{key}"] for key in ("before", "after", "change-percent")] == [
            str(delta["before"]),
            str(delta["after"]),
            str(delta["percent"]),
        ]
    assert report["gates_passed"] and float(outputs["flops-change-percent"]) < -10
    summary = (tmp_path / "summary.md").read_text()
    assert summary == Path(outputs["report-markdown"]).read_text() + "\n"
    assert "--min-flops-reduction" in summary and "neck.fuse\\_p4" in summary  # markdown escapes the _
    page = parse_html(Path(outputs["report-html"]).read_text())
    assert "neck.fuse_p4" in page.text() and page.find_all("svg")

    # A gate that fails: exit code 1, the reports are still there (the artifact is what says why).
    (tmp_path / "summary.md").unlink()
    failed = step(python, "plan", caller, **github, **inputs, INPUT_MAX_PARAMS="100K")
    assert failed.returncode == 1
    assert "rewrite: gate failed: --max-params: missed by 136,992 params" in failed.stderr
    assert Path(outputs["report-html"]).exists() and "--max-params" in (tmp_path / "summary.md").read_text()

    # Bad input: exit code 2 and rewrite's one line; the earlier run's reports are gone, not passed off as these.
    broken = step(python, "plan", caller, **github, **inputs | {"INPUT_MODEL": "models/detector.py:missing"})
    assert broken.returncode == 2 and broken.stderr.strip().splitlines()[-1].startswith("rewrite: error: ")
    assert not any((tmp_path / "reports").iterdir())
