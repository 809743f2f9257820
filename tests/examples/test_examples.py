"""The examples keep working: the script runs and prints the reference figures, the notebook's code runs top to
bottom, and the committed notebook carries its outputs (charts included) for readers on GitHub.

Neither test needs Jupyter: the notebook's code cells are run in order in one fresh namespace, with matplotlib on
its non-interactive Agg backend. Only that test needs matplotlib (the ``notebooks`` extra) and is skipped without it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import reference

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPT = EXAMPLES / "slim_neck_yolov5l.py"
NOTEBOOK = EXAMPLES / "yolov5l_slim_neck.ipynb"

# (params, FLOPs) of YOLOv5-L: base, GSConv-only and slim-neck.
BASE = reference.BASE["yolov5l"]
GSCONV_ONLY = reference.GSCONV_ONLY["yolov5l"]
SLIM_NECK = reference.SLIM_NECK["yolov5l"]


def code_cells(notebook: dict) -> list[str]:
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_script_prints_the_report_and_the_three_way_table(tmp_path):
    html = tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--html", str(html)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # The text report of the slim-neck plan: totals, and the eight neck sites.
    assert "rewrite plan: yolov5l with slim-neck" in out
    totals = out[out.index("Totals\n") :].split("\n\n")[0].splitlines()
    params, flops = (
        next(line.split() for line in totals if line.startswith(what)) for what in ("params", "FLOPs")
    )
    assert params[1:5] == [f"{BASE[0]:,}", f"{SLIM_NECK[0]:,}", f"{SLIM_NECK[0] - BASE[0]:,}", "-14.18%"]
    assert flops[1:5] == [f"{BASE[1]:,}", f"{SLIM_NECK[1]:,}", f"{SLIM_NECK[1] - BASE[1]:,}", "-11.07%"]
    assert "Rewritten sites (8)" in out
    assert "Conv(1024→512, k1, s1) → GSConv(1024→512, k1, s1)" in out
    assert "C3(1024→1024, s1) → VoVGSCSP(1024→1024, s1, n=3)" in out
    # The three-way table, one line per variant.
    table = out[out.index("Base vs GSConv-only vs slim-neck") :].splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table[4:7]}
    assert rows["base"] == ["0", f"{BASE[0]:,}", f"{BASE[1]:,}"]
    assert rows["gsconv-only"] == ["4", f"{GSCONV_ONLY[0]:,}", "-3.83%", f"{GSCONV_ONLY[1]:,}", "-2.09%"]
    assert rows["slim-neck"] == ["8", f"{SLIM_NECK[0]:,}", "-14.18%", f"{SLIM_NECK[1]:,}", "-11.07%"]
    # The rewritten model runs, and the user's model is left alone.
    assert "eval on 1×3×64×64: output (1, 252, 85) (original: (1, 252, 85))" in out
    assert "all 429 parameter tensors got a gradient" in out
    assert "original model untouched: model.10 is still Conv, model.13 still C3, same weights" in out
    assert html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert f"{SLIM_NECK[0]:,}" in html.read_text(encoding="utf-8")


def test_notebook_code_runs_in_order(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.close("all")
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: None)  # keep the figures, to check them below
    monkeypatch.chdir(tmp_path)  # the notebook writes its HTML report to the working directory
    namespace = {"__name__": "__main__"}
    try:
        for index, source in enumerate(code_cells(json.loads(NOTEBOOK.read_text(encoding="utf-8")))):
            exec(compile(source, f"{NOTEBOOK.name}, code cell {index}", "exec"), namespace)  # noqa: S102 - the notebook's own cells

        # Three charts (stages, sites, three-way comparison), each of two panels with bars in them.
        figures = [plt.figure(number) for number in plt.get_fignums()]
        assert len(figures) == 3
        for figure in figures:
            panels = figure.get_axes()
            assert len(panels) == 2 and all(len(ax.patches) >= 3 for ax in panels)
    finally:
        plt.close("all")

    plans = namespace["plans"]
    assert (plans["slim-neck"].params.before, plans["slim-neck"].flops.before) == BASE
    assert (plans["gsconv-only"].params.after, plans["gsconv-only"].flops.after) == GSCONV_ONLY
    assert (plans["slim-neck"].params.after, plans["slim-neck"].flops.after) == SLIM_NECK
    assert type(namespace["slim"].model[13]).__name__ == "VoVGSCSP"
    assert type(namespace["model"].model[13]).__name__ == "C3"
    assert (
        (tmp_path / "yolov5l_slim_neck_report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    )


def test_notebook_is_committed_with_its_outputs():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    counts = [cell["execution_count"] for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), "run the notebook top to bottom, in a fresh kernel"
    outputs = [output for cell in cells for output in cell["outputs"]]
    assert not [output for output in outputs if output["output_type"] == "error"]
    text = "".join(
        "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
        for output in outputs
    )
    for figure in (*BASE, *GSCONV_ONLY, *SLIM_NECK):
        assert f"{figure:,}" in text
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 3
