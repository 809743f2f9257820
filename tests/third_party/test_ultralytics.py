"""A rewritten YOLOv8 trains in ultralytics' own trainer: its loss, data loading, validation and checkpoints.

One epoch at 64x64 on CPU, on a tiny dataset generated in a temporary folder by the example's own generator
(the generated detection task and its YOLO-format labels). Nothing is downloaded: the model is built from its YAML,
plots (which fetch a font) are off and ultralytics runs offline, with its settings file in a temporary folder.
"""

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Read by ultralytics when it is imported: no network checks, and settings outside the user's home.
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="rewrite-ultralytics-"))
ultralytics = pytest.importorskip("ultralytics")

import rewrite
from rewrite.integrations.ultralytics import WARM_FINE_TUNE, rewrite_detection_model, train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Works today on ultralytics' YOLOv8: its two neck downsampling convs (3x3, stride 2) become GSConvs.
NECK_CONVS = EXAMPLES / "rules" / "yolov8-neck-gsconv.toml"

SLIM_NECK_V8 = "slim-neck-v8" in rewrite.builtin_rule_sets()
RULES = [
    pytest.param(NECK_CONVS, id="neck-convs"),
    pytest.param(
        "slim-neck-v8",
        id="slim-neck-v8",
        marks=pytest.mark.skipif(
            not SLIM_NECK_V8, reason="the built-in rule set slim-neck-v8 is not there yet"
        ),
    ),
]


def make_dataset(root: Path) -> Path:
    """The example's demo dataset: 8 train and 4 val images of the generated task, their labels, a data YAML."""
    spec = importlib.util.spec_from_file_location("train_ultralytics", EXAMPLES / "train_ultralytics.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.demo_dataset(root)


@pytest.mark.parametrize("rules", RULES)
def test_one_epoch_trains_saves_reloads_and_validates(tmp_path, rules):
    data = make_dataset(tmp_path / "data")

    yolo = train(
        model="yolov8n.yaml",
        rules=rules,
        data=str(data),
        epochs=1,
        imgsz=64,
        batch=2,
        device="cpu",
        workers=0,
        project=str(tmp_path / "runs"),
        name="slim",
        plots=False,
        amp=False,
        verbose=False,
    )

    trainer = yolo.trainer
    losses = trainer.tloss.values() if isinstance(trainer.tloss, dict) else [trainer.tloss]
    assert all(torch.isfinite(torch.as_tensor(loss)).all() for loss in losses)
    epoch = trainer.csv.read_text().splitlines()  # ultralytics' own log of the epoch: losses and metrics
    assert len(epoch) == 2 and "train/box_loss" in epoch[0]
    assert trainer.last.exists()
    # The checkpoint loads back with ultralytics' own loader and still holds the GS blocks.
    reloaded = ultralytics.YOLO(str(trainer.last))
    blocks = [
        type(m).__name__ for m in reloaded.model.modules() if isinstance(m, rewrite.GSConv | rewrite.VoVGSCSP)
    ]
    assert blocks
    if rules == NECK_CONVS:
        assert blocks == ["GSConv", "GSConv"] and isinstance(reloaded.model.model[16], rewrite.GSConv)
    assert yolo.metrics is not None and "metrics/mAP50(B)" in yolo.metrics.results_dict
    # Validation runs on the reloaded checkpoint too.
    metrics = reloaded.val(
        data=str(data), imgsz=64, batch=2, device="cpu", workers=0, plots=False, verbose=False
    )
    assert set(metrics.results_dict) >= {"metrics/precision(B)", "metrics/mAP50-95(B)"}


@pytest.mark.filterwarnings("ignore::rewrite.NoMatchWarning")  # the plan warns, then train() fails
def test_a_rule_set_that_rewrites_nothing_fails_before_training(tmp_path):
    nothing = NECK_CONVS.read_text().replace('match.module = ["Conv"]', 'match.module = ["C3"]')
    with pytest.raises(rewrite.NoMatchError, match="rewrites nothing in DetectionModel"):
        train(model="yolov8n.yaml", rules=rewrite.parse_rules(nothing), data=str(tmp_path / "missing.yaml"))


def test_the_rewritten_model_keeps_ultralytics_class_and_routing():
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    slim = rewrite_detection_model(model, NECK_CONVS, imgsz=64)
    assert type(slim) is DetectionModel and slim.yaml == model.yaml
    assert (slim.model[16].i, slim.model[16].f) == (model.model[16].i, model.model[16].f)
    assert type(model.model[16]).__name__ == "Conv"  # the model given stays as it was


BASE_OPTIONS = {
    "epochs": 1,
    "imgsz": 64,
    "batch": 4,
    "device": "cpu",
    "workers": 0,
    "plots": False,
    "val": True,
    "verbose": False,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A YOLOv8n trained one epoch on the tiny dataset: its data YAML and checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    data = make_dataset(root / "data")
    yolo = ultralytics.YOLO("yolov8n.yaml")
    yolo.train(data=str(data), project=str(root / "runs"), name="base", **BASE_OPTIONS)
    return data, yolo.trainer.last


@pytest.fixture(scope="module")
def fine_tuned(trained, tmp_path_factory, monkeypatch_module):
    """train(warm_start=...) from the trained checkpoint, one epoch; what it logged, and the model the
    trainer was given after the warm start and the one it starts its epoch with."""
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import LOGGER

    from rewrite.integrations.ultralytics import RewriteTrainer

    data, checkpoint = trained
    states: dict[str, dict] = {}
    warm_start, setup = RewriteTrainer._warm_start, DetectionTrainer._setup_train

    def recorded_warm_start(self, rewritten, original):
        report = warm_start(self, rewritten, original)
        states["warm-started"] = {k: v.clone() for k, v in rewritten.state_dict().items()}
        return report

    def recorded_setup(self):
        setup(self)  # the optimizer and the EMA are built: the next thing is the first step
        states["training starts"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        states["ema starts"] = {k: v.clone() for k, v in self.ema.ema.state_dict().items()}

    monkeypatch_module.setattr(RewriteTrainer, "_warm_start", recorded_warm_start)
    monkeypatch_module.setattr(DetectionTrainer, "_setup_train", recorded_setup)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    LOGGER.addHandler(handler)
    try:
        yolo = train(
            model=str(checkpoint),
            rules="slim-neck-v8",
            warm_start=2,
            data=str(data),
            project=str(tmp_path_factory.mktemp("runs")),
            name="slim",
            **BASE_OPTIONS,
        )
    finally:
        LOGGER.removeHandler(handler)
    return yolo, lines, states


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.skipif(not SLIM_NECK_V8, reason="the built-in rule set slim-neck-v8 is not there yet")
def test_warm_start_then_one_epoch_of_fine_tuning_and_the_log_says_what_it_did(trained, fine_tuned):
    yolo, lines, states = fine_tuned
    trainer = yolo.trainer
    report = trainer.warm_start_report
    assert isinstance(report, rewrite.WarmStartReport)
    sites = [site.path for site in report.sites]
    assert sites == ["model.12", "model.15", "model.16", "model.18", "model.19", "model.21"]
    log = "\n".join(lines)
    assert f"6 new block(s) ({', '.join(sites)})" in log
    assert "on 8 training image(s) at 64, labels unused, within 2 s" in log
    assert str(report) in log  # the table: per site and for the whole model, the error before and after
    # The trainer fine-tunes the warm-started model, not one with fresh blocks: its weights, and its EMA's,
    # are those the warm start left, up to the first step.
    started, warm = states["training starts"], states["warm-started"]
    assert started.keys() == warm.keys()
    assert all(torch.equal(started[k], warm[k]) for k in warm)
    assert all(torch.equal(states["ema starts"][k].float(), warm[k].float()) for k in warm)
    # One epoch of fine-tuning, validated, with the schedule after a warm start (the caller set none of it).
    assert len(trainer.csv.read_text().splitlines()) == 2
    assert "metrics/mAP50-95(B)" in yolo.metrics.results_dict
    assert {key: getattr(trainer.args, key) for key in WARM_FINE_TUNE} == WARM_FINE_TUNE
    assert sum(isinstance(m, rewrite.VoVGSCSP) for m in ultralytics.YOLO(trainer.last).model.modules()) == 4


def test_a_warm_start_needs_trained_weights(tmp_path):
    with pytest.raises(rewrite.InputSpecError, match="no trained weights to warm-start"):
        train(model="yolov8n.yaml", rules=NECK_CONVS, warm_start=True, data=str(tmp_path / "missing.yaml"))
    with pytest.raises(rewrite.InputSpecError, match="warm_start=-5: pass a positive number of seconds"):
        train(model="yolov8n.yaml", rules=NECK_CONVS, warm_start=-5)


@pytest.mark.skipif(not SLIM_NECK_V8, reason="the built-in rule set slim-neck-v8 is not there yet")
def test_rewrite_train_on_the_command_line(trained, tmp_path, capsys, caplog):
    from rewrite.cli import main

    caplog.set_level(logging.INFO, logger="ultralytics")

    data, checkpoint = trained
    options = [f"{key}={value}" for key, value in BASE_OPTIONS.items() if key != "epochs"]
    code = main(
        ["train", str(checkpoint), "--rules", "slim-neck-v8", "--data", str(data), "--epochs", "1"]
        + ["--warm-start", "1", *options, f"project={tmp_path}", "name=cli", "lr0=0.003"]
    )
    assert code == 0
    out = capsys.readouterr().out
    best = tmp_path / "cli" / "weights" / "best.pt"
    assert f"checkpoint: {best}" in out and "validation: mAP50 " in out
    assert "rewrite warm start: 6 new block(s)" in caplog.text
    # The fine-tune schedule's optimizer, with the learning rate given on the command line.
    assert "AdamW(lr=0.003," in caplog.text
    assert any(isinstance(m, rewrite.GSConv) for m in ultralytics.YOLO(best).model.modules())


def test_rewrite_train_without_the_extra_is_one_line_naming_it():
    code = (
        "import sys; sys.modules['ultralytics'] = None\n"
        "from rewrite.cli import main\n"
        "sys.exit(main(['train', 'best.pt', '--rules', 'slim-neck-v8', '--data', 'd.yaml', '--epochs', '2']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr == (
        "rewrite: error: rewrite train needs the ultralytics extra: pip install 'fx-rewrite[ultralytics]'\n"
    )


@pytest.mark.skipif(not SLIM_NECK_V8, reason="the built-in rule set slim-neck-v8 is not there yet")
def test_compare_measures_both_and_renders_text_markdown_and_html(trained, fine_tuned):
    from rewrite.integrations.ultralytics import compare

    data, base = trained
    slim = fine_tuned[0]
    comparison = compare(base, slim, data=data, imgsz=64, device="cpu", batch=4, workers=0)
    before, after = comparison.base, comparison.slim
    assert before.name == str(base) and after.name == str(slim.trainer.best)
    assert after.params < before.params and after.flops < before.flops
    assert before.latency_ms > 0 and after.latency_ms > 0
    assert all(0 <= m <= 1 for m in (before.map50, before.map50_95, after.map50, after.map50_95))
    # The same validation as ultralytics' own of that checkpoint.
    assert after.map50_95 == pytest.approx(slim.metrics.box.map, abs=1e-6)

    text = str(comparison)
    change = f"{after.params - before.params:+,}"
    percent = f"{100 * (after.params - before.params) / before.params:+.2f}%"
    params_row = next(line for line in text.splitlines() if line.startswith("params "))
    assert params_row.split() == ["params", f"{before.params:,}", f"{after.params:,}", change, percent]
    for label in ("FLOPs", "latency (ms)", "mAP50", "mAP50-95"):
        assert f"\n{label} " in text
    assert (
        f"| params       | {before.params:>10,} | {after.params:>10,} | {change:>10} |"
        in comparison.render("markdown")
    )
    page = comparison.render("html")
    assert page.startswith("<!DOCTYPE html>") and f'<td class="num">{after.map50_95:.4f}</td>' in page
    with pytest.raises(ValueError, match="text, markdown or html"):
        comparison.render("json")
