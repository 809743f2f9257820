"""A rewritten YOLOv8 trains in ultralytics' own trainer: its loss, data loading, validation and checkpoints.

One epoch at 64x64 on CPU, on a tiny dataset generated in a temporary folder by the example's own generator
(the generated detection task and its YOLO-format labels). Nothing is downloaded: the model is built from its YAML,
plots (which fetch a font) are off and ultralytics runs offline, with its settings file in a temporary folder.
"""

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Read by ultralytics when it is imported: no network checks, and settings outside the user's home.
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="rewrite-ultralytics-"))
ultralytics = pytest.importorskip("ultralytics")

import rewrite
from rewrite.integrations.ultralytics import rewrite_detection_model, train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
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
