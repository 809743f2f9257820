"""Every way the ``rewrite`` command can end, and its exit code (the table in docs/cli.md).

Most run ``main()`` in-process (each subprocess pays 2-3 s for importing torch); what depends on the real
stdout (a closed pipe, a full disk) runs as a subprocess.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rewrite.cli.commands
from rewrite.cli import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_GATE_FAILED,
    EXIT_INTERNAL_ERROR,
    EXIT_OK,
    EXIT_OUTPUT_FAILED,
    main,
)

SMALL = "--input 1,3,64,64 --device meta --quiet"


def run(command: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(shlex.split(command))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, out: str, err: str) -> str:
    """The bad-input contract: exit code 2, one ``rewrite: error:`` line on stderr, nothing on stdout."""
    assert code == EXIT_BAD_INPUT, err
    assert out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("rewrite: error: "), err
    return err.strip()


def test_the_exit_codes_are_distinct():
    codes = [
        EXIT_OK,
        EXIT_GATE_FAILED,
        EXIT_BAD_INPUT,
        EXIT_INTERNAL_ERROR,
        EXIT_OUTPUT_FAILED,
        EXIT_BROKEN_PIPE,
    ]
    assert codes == [0, 1, 2, 3, 4, 141]


@pytest.mark.parametrize("value", ["0", "abc", "-3", "2.5", "true"])
def test_a_bad_zoo_argument_is_bad_input_naming_it(capsys, value):
    line = one_error_line(*run(f"plan yolov5n --rules slim-neck {SMALL} --model-arg nc={value}", capsys))
    assert "model 'yolov5n': argument nc must be a positive integer (the number of classes)" in line


@pytest.mark.parametrize(
    "shape, message",
    [
        ("1,3,99999999999999999999,64", "more than a tensor can hold"),
        ("1,3,4294967296,4294967296", "more than a tensor can hold"),
        # Arabic-Indic digits: str.isdigit() says yes.
        ("1,3,٦٤,64", "expected comma-separated positive integers"),
    ],
)
def test_an_impossible_input_shape_is_bad_input(capsys, shape, message):
    line = one_error_line(*run(f"plan yolov5n --rules slim-neck --input {shape} --quiet", capsys))
    assert f"--input '{shape}'" in line and message in line


def test_an_input_larger_than_the_memory_is_refused_before_allocating(capsys, monkeypatch):
    monkeypatch.setattr(rewrite.cli.commands, "_physical_memory", lambda: 10**6)  # 1 MB of "memory"
    line = one_error_line(*run("profile yolov5n --input 1,3,640,640 --quiet", capsys))
    assert line == (
        "rewrite: error: --input 1,3,640,640: the example input alone needs 0.0 GB, more than this machine's 0.0 GB"
        " of memory; use a smaller shape, or --device meta (which allocates nothing)"
    )


def test_an_input_that_cannot_be_allocated_is_bad_input(capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(torch, "rand", out_of_memory)
    line = one_error_line(*run("profile yolov5n --input 1,3,64,64 --quiet", capsys))
    assert line.startswith("rewrite: error: --input 1,3,64,64: cannot make the example input on cpu")
    assert "can't allocate memory" in line and line.endswith("use a smaller shape, or --device meta")


@pytest.mark.parametrize(
    "gate",
    [
        "--min-flops-reduction 150",
        "--min-params-reduction 150",
        "--min-flops-reduction -5",
        "--min-params-reduction=-0.5%",
        "--min-flops-reduction nan",
        "--max-params " + "9" * 400,
    ],
)
def test_a_gate_that_can_never_pass_or_means_nothing_is_bad_input(capsys, gate):
    line = one_error_line(*run(f"plan yolov5n --rules slim-neck {SMALL} {gate}", capsys))
    assert line.startswith(f"rewrite: error: argument {gate.split()[0].split('=')[0]}: expected a ")


def test_an_unwritable_step_summary_is_a_warning_and_the_gates_decide(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "no" / "such" / "dir" / "summary.md"))
    code, out, err = run(f"plan yolov5n --rules slim-neck {SMALL} --max-params 1M", capsys)
    assert code == EXIT_GATE_FAILED and "Rewritten sites (8)" in out
    assert err.splitlines() == [
        (
            f"rewrite: warning: GITHUB_STEP_SUMMARY={tmp_path}/no/such/dir/summary.md: cannot append the report: "
            "No such file or directory"
        ),
        "rewrite: gate failed: --max-params: missed by 669,693 params",
    ]
    code, out, err = run(f"profile yolov5n {SMALL}", capsys)
    assert code == EXIT_OK and out and err.startswith("rewrite: warning: GITHUB_STEP_SUMMARY=")


def test_an_error_in_the_models_code_is_an_internal_error_with_its_traceback(capsys, tmp_path):
    (tmp_path / "broken.py").write_text(
        textwrap.dedent(
            """\
            def build():
                return helper()

            def helper():
                raise RuntimeError("weights file\\nmissing")
            """
        )
    )
    code, out, err = run(f"profile {tmp_path}/broken.py:build {SMALL}", capsys)
    assert code == EXIT_INTERNAL_ERROR and out == ""
    assert err.startswith("Traceback (most recent call last):") and "in helper" in err
    assert err.splitlines()[-1] == (
        "rewrite: internal error: RuntimeError: weights file missing (exit code 3: a bug in rewrite or in the"
        " model's code; the traceback above says where)"
    )


def test_a_builder_registered_in_the_model_file_is_known_to_the_rules(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("det.py").write_text(
        POINTWISE + "from rewrite.zoo import create_model\n\n"
        "def build():\n    return create_model('yolov5n')\n"
    )
    Path("rules.toml").write_text(POINTWISE_RULES)
    code, out, err = run(f"plan det.py:build --rules rules.toml {SMALL}", capsys)
    assert code == EXIT_OK, err
    assert "Rewritten sites (3)" in out and "Conv2d(64→255, k1, s1) → Conv2d(64→255, k1, s1)" in out


def test_import_registers_builders_for_plan_and_rules_check(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("my_builders.py").write_text(POINTWISE)
    Path("rules.toml").write_text(POINTWISE_RULES)

    line = one_error_line(*run("rules check rules.toml", capsys))
    assert "unknown builder 'Pointwise'" in line and "register others" in line

    code, out, err = run("rules check rules.toml --import my_builders.py", capsys)
    assert (code, out, err) == (EXIT_OK, "OK: rules.toml: rule set 'pointwise', 1 rule: heads\n", "")
    # The same file twice registers its builders once.
    code, out, err = run(
        f"plan yolov5n --rules rules.toml --import my_builders.py --import ./my_builders.py {SMALL}", capsys
    )
    assert code == EXIT_OK and "Rewritten sites (3)" in out, err
    # A module name, found from the working directory.
    Path("other_builders.py").write_text(POINTWISE.replace('"Pointwise"', '"Pointwise2"'))
    Path("rules2.toml").write_text(POINTWISE_RULES.replace('"Pointwise"', '"Pointwise2"'))
    code, out, err = run(f"plan yolov5n --rules rules2.toml --import other_builders {SMALL}", capsys)
    assert code == EXIT_OK and "Rewritten sites (3)" in out, err

    line = one_error_line(*run(f"plan yolov5n --rules rules.toml --import nowhere.py {SMALL}", capsys))
    assert line == "rewrite: error: --import nowhere.py: file nowhere.py does not exist"
    line = one_error_line(*run(f"plan yolov5n --rules rules.toml --import no_such_module {SMALL}", capsys))
    assert line.startswith("rewrite: error: --import no_such_module: cannot import no_such_module:")


POINTWISE = """\
from torch import nn
from rewrite.builders import Site, register_builder

@register_builder("Pointwise")
def pointwise(site: Site, *, bias: bool = False) -> nn.Module:
    return nn.Conv2d(site.in_channels, site.out_channels, 1, site.stride, bias=bias)

"""
POINTWISE_RULES = """\
[ruleset]
name = "pointwise"
scope = "head"

[[rule]]
name = "heads"
match.chain = ["conv"]
where.kernel_size = 1
replace.builder = "Pointwise"
replace.bias = true
"""


# --- stdout: a subprocess each, as the real file descriptor is what is under test ---


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rewrite", *args]


def test_stdout_closed_early_is_the_sigpipe_convention_without_a_traceback(tmp_path):
    process = subprocess.Popen(
        _command("rules", "list"), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # the reader is gone before the first line, as `| head -0` would be
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_BROKEN_PIPE
    assert err == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_stdout_is_one_line_and_its_own_exit_code(tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            _command("rules", "list"),
            check=False,
            cwd=tmp_path,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert result.returncode == EXIT_OUTPUT_FAILED
    assert result.stderr == "rewrite: error: cannot write the report to stdout: No space left on device\n"
