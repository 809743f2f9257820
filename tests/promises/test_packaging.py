"""The repository's promises about itself: README commands, CI, shipped rule sets."""

import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", text, flags=re.DOTALL)


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    main_job, tests = readme_commands()[:2]
    assert "rewrite plan yolov5l --rules slim-neck" in main_job
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci


def test_both_commands_pin_torch_through_the_constraints_file():
    constraints = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==\S+$", constraints, flags=re.MULTILINE)
    assert re.search(r"^torchvision==\S+$", constraints, flags=re.MULTILINE)
    for command in readme_commands()[:2]:
        assert "-c constraints.txt" in command


def test_rule_sets_ship_inside_the_package():
    shipped = {entry.name for entry in resources.files("rewrite.rulesets").iterdir()}
    assert {"slim-neck.toml", "gsconv-only.toml"} <= shipped


def test_every_package_of_the_library_ships():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "rewrite").rglob("__init__.py")
    }
    assert folders <= listed, f"add to pyproject.toml's packages: {sorted(folders - listed)}"


def test_the_core_install_imports_without_numpy_and_warns_nothing():
    # The core dependencies do not bring NumPy; torch.fx's import warns without it (rewrite/__init__.py).
    code = "import sys; sys.modules['numpy'] = None; import rewrite"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], check=False, cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
