"""The train-and-evaluate notebook runs under a real Jupyter kernel, and is committed with the outputs of a full run.

Under the suite it runs with ``REWRITE_NOTEBOOK_BUDGET=small``: a generated task of 16 training images at 64 px,
one epoch of base training and one of each fine-tune, a 3-second warm start — every cell, ultralytics' trainer
and validator included, in about a minute. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "train_and_evaluate.ipynb"


def outputs_of(notebook: dict) -> list[dict]:
    return [output for cell in notebook["cells"] if cell["cell_type"] == "code" for output in cell["outputs"]]


def printed(outputs: list[dict]) -> str:
    return "".join(
        "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
        for output in outputs
    )


def test_the_notebook_runs_under_a_kernel_with_a_small_budget(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ultralytics")
    monkeypatch.setenv("REWRITE_NOTEBOOK_BUDGET", "small")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics-settings"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3").execute()

    outputs = outputs_of(notebook)
    assert not [output for output in outputs if output["output_type"] == "error"]
    text = printed(outputs)
    assert "'train_images': 16" in text  # the small budget, not the full one
    assert "8 site(s) on" in text  # the warm start's report: slim-neck's eight sites
    markdown = "".join(output.get("data", {}).get("text/markdown", "") for output in outputs)
    assert "### Side by side" in markdown and "| mAP50-95" in markdown  # compare's table, rendered
    assert "fold: max difference" in text and "Exported(" in text
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2  # the task and the curves


def test_the_notebook_is_committed_with_the_outputs_of_a_full_run():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert [cell["execution_count"] for cell in cells] == list(range(1, len(cells) + 1))
    outputs = outputs_of(notebook)
    assert not [output for output in outputs if output["output_type"] == "error"]
    text = printed(outputs)
    assert "'train_images': 1000" in text and "'base_epochs': 20" in text
    assert "warm start:" in text and "fresh blocks:" in text
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 2
