"""The ``rewrite`` command end to end, as CI runs it: a subprocess, its exit code, stdout, stderr and files.

Each run pays for importing torch (2-3 s), so every test checks as much as one run can show, and the models
are small (yolov5n at 64x64, mostly on meta).
"""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from html_page import parse_html
from reference import BASE, GSCONV_ONLY, SLIM_NECK, SLIM_NECK_STATE_DICTS
from rule_sets import chain_rule_toml

ROOT = Path(__file__).resolve().parents[1]
SMALL = "--input 1,3,64,64 --device meta"
GOOD_RULES = chain_rule_toml(
    name="neck-convs", scope="neck", not_inside=["C3"], where={"out_channels": {"multiple_of": 2}}
)
BAD_RULES = GOOD_RULES.replace("match.chain", "mach.chain")


def rewrite(command: str, cwd: Path, summary: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``rewrite COMMAND`` (written as in a shell) in ``cwd``; ``summary`` plays GitHub's step summary."""
    env = {key: value for key, value in os.environ.items() if key != "GITHUB_STEP_SUMMARY"}
    if summary is not None:
        env["GITHUB_STEP_SUMMARY"] = str(summary)
    argv = [sys.executable, "-m", "rewrite", *shlex.split(command)]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The exit-code-2 contract: one ``rewrite: error:`` line on stderr, no traceback, nothing on stdout."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("rewrite: error: ")
    assert all(not line.startswith("rewrite: error") for line in lines[:-1])
    return lines[-1]


def test_plan_text_with_every_gate_passing_and_the_step_summary(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    result = rewrite(
        f"plan yolov5n --rules slim-neck {SMALL} --fail-on-no-match --max-params 1.7M --max-flops 1G"
        " --min-params-reduction 10 --min-flops-reduction 7%",
        tmp_path,
        summary,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("rewrite plan: yolov5n with slim-neck\n")
    assert f"{BASE['yolov5n'][0]:,}" in out and f"{SLIM_NECK['yolov5n'][0]:,}" in out and "-10.81%" in out
    assert "Rewritten sites (8)" in out and "GSConv(" in out and "VoVGSCSP(" in out
    gates = out.split("Gates\n")[1].split("\n\n")[0]
    assert gates.count(" pass ") == 5 and "FAIL" not in gates and "all 5 passed" in out
    assert "building yolov5n on meta" in result.stderr and "gate failed" not in result.stderr

    text = summary.read_text()
    assert text.startswith("earlier step\n## rewrite plan: yolov5n with slim-neck\n")  # appended, as markdown
    assert "### Gates" in text and re.search(r"(?m)^\|:-+\|", text)


def test_plan_json_to_a_file_with_every_gate_failing(tmp_path):
    result = rewrite(
        f"plan yolov5n --rules slim-neck {SMALL} --quiet --format json --output reports/plan.json"
        " --max-params 1M --max-flops 10M --min-params-reduction 50 --min-flops-reduction 50",
        tmp_path,
    )
    assert result.returncode == 1
    assert result.stdout == ""  # the report went to the file
    assert result.stderr.splitlines() == [  # --quiet: no progress, only the failed gates
        "rewrite: gate failed: --max-params: missed by 669,693 params",
        "rewrite: gate failed: --max-flops: missed by 31,449,472 FLOPs",
        "rewrite: gate failed: --min-params-reduction: missed by 39.19 percentage points",
        "rewrite: gate failed: --min-flops-reduction: missed by 42.77 percentage points",
    ]
    data = json.loads((tmp_path / "reports" / "plan.json").read_text())
    assert data["schema_version"] == 1 and data["model"] == "yolov5n" and data["rules"] == "slim-neck"
    assert data["input_shapes"] == [[1, 3, 64, 64]] and data["device"] == "meta"
    assert data["gates_passed"] is False
    assert [(g["gate"], g["threshold"], g["passed"]) for g in data["gates"]] == [
        ("max-params", 1_000_000, False),
        ("max-flops", 10_000_000, False),
        ("min-params-reduction", 50.0, False),
        ("min-flops-reduction", 50.0, False),
    ]
    assert data["gates"][0]["measured"] == SLIM_NECK["yolov5n"][0]
    assert data["gates"][0]["margin"] == 1_000_000 - SLIM_NECK["yolov5n"][0]


def test_fail_on_no_match_fails_when_the_scope_leaves_nothing_to_rewrite(tmp_path):
    # No CSP block in the head, and its 1x1 convs give 255 channels, which GSConv cannot halve: nothing rewritten.
    result = rewrite(
        f"plan yolov5n --rules slim-neck --scope head {SMALL} --fail-on-no-match --format markdown", tmp_path
    )
    assert result.returncode == 1
    assert "rewrite: gate failed: --fail-on-no-match: 1 rule matched nothing" in result.stderr
    assert "### Rewritten sites (0)" in result.stdout
    assert "| --fail-on-no-match |" in result.stdout and "| FAIL " in result.stdout


def test_plan_markdown_and_html(tmp_path):
    markdown = rewrite(f"plan yolov5n --rules gsconv-only {SMALL} --format markdown", tmp_path)
    assert markdown.returncode == 0, markdown.stderr
    assert markdown.stdout.startswith("## rewrite plan: yolov5n with gsconv-only\n")
    assert "| params |" in markdown.stdout and f"{GSCONV_ONLY['yolov5n'][0]:,}" in markdown.stdout
    assert re.search(r"(?m)^\| path +\| stage +\| rule", markdown.stdout)

    html = rewrite(f"plan yolov5n --rules slim-neck {SMALL} --format html --output r.html", tmp_path)
    assert html.returncode == 0, html.stderr
    page = (tmp_path / "r.html").read_text()
    tree = parse_html(page)
    assert page.startswith("<!DOCTYPE html>") and len(tree.find_all("svg")) == 2
    assert f"{SLIM_NECK['yolov5n'][0]:,}" in tree.text()
    assert not re.search(r"https?://|<script|<link", page)


def test_several_formats_from_one_plan_into_a_folder(tmp_path):
    summary = tmp_path / "summary.md"
    result = rewrite(
        f"plan yolov5n --rules slim-neck {SMALL} --format markdown,html,json --output out/", tmp_path, summary
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr.count("building yolov5n") == 1  # one plan, three reports
    reports = {path.name: path.read_text() for path in (tmp_path / "out").iterdir()}
    assert sorted(reports) == ["report.html", "report.json", "report.md"]
    assert json.loads(reports["report.json"])["totals"]["params"]["after"] == SLIM_NECK["yolov5n"][0]
    assert reports["report.html"].startswith("<!DOCTYPE html>")
    assert summary.read_text() == reports["report.md"] + "\n"  # the step summary gets the markdown once

    # Stdout or one file takes one report: refused before any work is done.
    for output in ("", "--output report.txt"):
        line = one_error_line(
            rewrite(f"plan yolov5n --rules slim-neck {SMALL} --format html,json {output}", tmp_path)
        )
        assert "--format html,json writes one report per format: --output must name a folder" in line
    assert "unknown report format 'pdf'" in one_error_line(
        rewrite("profile yolov5n --format text,pdf", tmp_path)
    )


@pytest.mark.parametrize(
    "command, message",
    [
        ("plan yolov5q --rules slim-neck", "unknown model 'yolov5q'"),
        ("plan nowhere.py:build --rules slim-neck", "model file nowhere.py does not exist"),
        ("plan yolov5n --rules bad.toml", "bad.toml: rule 'conv-to-gsconv': unknown key 'mach'"),
        (f"plan yolov5n --rules slim-neck {SMALL} --scope model.99", "model.99"),
        ("plan yolov5n --rules slim-neck --input 1,3,64x64", "--input '1,3,64x64'"),
        ("plan yolov5n --rules slim-neck --max-flops lots", "argument --max-flops"),
        ("apply yolov5n --rules slim-neck --output out --device meta", "apply needs real weights"),
        ("rules check bad.toml", "unknown key 'mach' in rule; did you mean 'match'?"),
    ],
    ids=["zoo-name", "model-file", "rules-file", "scope", "shape", "gate", "apply-on-meta", "rules-check"],
)
def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, command, message):
    (tmp_path / "bad.toml").write_text(BAD_RULES)
    assert message in one_error_line(rewrite(command, tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command",
    [
        f"profile yolov5n {SMALL} --output taken.txt/report.txt",
        "apply yolov5n --rules slim-neck --input 1,3,64,64 --output taken.txt",
    ],
    ids=["report-folder-is-a-file", "apply-folder-is-a-file"],
)
def test_an_unwritable_output_is_one_error_line_and_exit_code_2(tmp_path, monkeypatch, capsys, command):
    # In-process (main() rather than a subprocess): only the error path is under test.
    from rewrite.cli import main

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken.txt").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    assert main([*shlex.split(command), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("rewrite: error: --output taken") and "cannot write there" in captured.err
    assert captured.err.count("\n") == 1


def test_rules_list_and_check(tmp_path):
    listed = rewrite("rules list", tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"(?m)^slim-neck: .*VoV-GSCSP.* \(2 rules\)$", listed.stdout)
    assert re.search(r"(?m)^gsconv-only: ", listed.stdout)

    (tmp_path / "neck.toml").write_text(GOOD_RULES)
    checked = rewrite("rules check neck.toml", tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == "OK: neck.toml: rule set 'neck-convs', 1 rule: conv-to-gsconv\n"


def test_profile_of_a_model_file_with_model_args(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "helpers.py").write_text("CLASSES = 3\n")  # a neighbour the model file imports
    (tmp_path / "models" / "det.py").write_text(
        textwrap.dedent(
            """\
            from helpers import CLASSES
            from rewrite.zoo import create_model

            def build(nc, scale=1.0, half=True, tag=None, name=""):
                # The CLI parses --model-arg values: check that each arrived with its type.
                got = (nc, scale, half, tag, name)
                assert got == (CLASSES, 0.5, False, None, "v5") and type(nc) is int, got
                return create_model("yolov5n", nc=nc).train()  # the CLI must put it in eval mode
            """
        )
    )
    summary = tmp_path / "summary.md"
    result = rewrite(
        f"profile models/det.py:build {SMALL} --format json --model-arg nc=3 --model-arg scale=0.5"
        " --model-arg half=false --model-arg tag=none --model-arg name=v5",
        tmp_path,
        summary,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["report"] == "profile" and data["device"] == "meta"
    assert data["model"] == "models/det.py:build(nc=3, scale=0.5, half=False, tag=None, name='v5')"
    # nc=3 shrinks the head's three 1x1 convs (64, 128, 256 inputs, with bias) from 3 * 85 to 3 * 8 outputs.
    assert data["totals"]["params"] == BASE["yolov5n"][0] - 3 * 77 * (64 + 128 + 256 + 3)
    assert [m["path"] for m in data["modules"]] == [f"model.{i}" for i in range(25)]
    assert list(data["stages"])[:3] == ["backbone", "neck", "head"]
    assert summary.read_text().startswith("## rewrite profile: models/det.py:build(")


def test_apply_writes_recipe_weights_and_plan_that_load_back(tmp_path):
    from safetensors.torch import load_file

    import rewrite as library

    result = rewrite("apply yolov5n --rules slim-neck --input 1,3,64,64 --output out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Rewritten sites (8)" in result.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "recipe.json", "weights.safetensors"]
    state = load_file(out / "weights.safetensors")
    assert len(state) == SLIM_NECK_STATE_DICTS["yolov5n"][0]
    assert state["model.10.cv2.conv.weight"].shape == (64, 1, 5, 5)
    params = [t for key, t in state.items() if not re.search(r"running_|num_batches|anchors", key)]
    assert sum(t.numel() for t in params) == SLIM_NECK["yolov5n"][0]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["totals"]["params"]["after"] == SLIM_NECK["yolov5n"][0] and plan["device"] == "meta"
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == {"spec": "yolov5n", "args": {}} and recipe["input_shape"] == [1, 3, 64, 64]
    loaded = library.load(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_a_failed_apply_leaves_the_previous_outputs_intact(tmp_path, monkeypatch, capsys):
    from rewrite import files
    from rewrite.cli import main

    out = tmp_path / "out"
    out.mkdir()
    old = {name: f"old {name}" for name in ("recipe.json", "weights.safetensors", "plan.json")}
    for name, text in old.items():
        (out / name).write_text(text)
    real_write, calls = files._write, []

    def full_disk_on_the_third_file(path, content):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_write(path, content)

    monkeypatch.setattr(files, "_write", full_disk_on_the_third_file)
    monkeypatch.chdir(tmp_path)
    assert (
        main(["apply", "yolov5n", "--rules", "slim-neck", "--input", "1,3,64,64", "--output", "out", "-q"])
        == 2
    )
    assert (
        capsys.readouterr().err
        == "rewrite: error: --output out: cannot write there: No space left on device\n"
    )
    assert {p.name: p.read_text() for p in out.iterdir()} == old  # the old set, and no temporary file


@pytest.mark.parametrize("output", ["reports/", "existing"])
def test_a_report_output_naming_a_folder_gets_report_dot_ext(tmp_path, monkeypatch, output):
    from rewrite.cli import main

    (tmp_path / "existing").mkdir()
    monkeypatch.chdir(tmp_path)
    assert (
        main(["profile", "yolov5n", *shlex.split(SMALL), "--format", "json", "--output", output, "-q"]) == 0
    )
    folder = tmp_path / output.rstrip("/")
    assert [p.name for p in folder.iterdir()] == ["report.json"]
    assert json.loads((folder / "report.json").read_text())["report"] == "profile"


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_slim_neck_yolov5l_reproduces_the_reference_figures(tmp_path, device):
    result = rewrite(f"plan yolov5l --rules slim-neck --format json --device {device}", tmp_path)
    assert result.returncode == 0, result.stderr
    totals = json.loads(result.stdout)["totals"]
    assert (totals["params"]["before"], totals["flops"]["before"]) == BASE["yolov5l"]
    assert (totals["params"]["after"], totals["flops"]["after"]) == SLIM_NECK["yolov5l"]
