"""A rewritten YOLOv8 trains in ultralytics' own trainer: its loss, data loading, validation and checkpoints.

One epoch at 64x64 on CPU, on a tiny dataset generated in a temporary folder (coloured rectangles and their
YOLO-format labels). Nothing is downloaded: the model is built from its YAML, plots (which fetch a font) are off
and ultralytics runs offline, with its settings file in the temporary folder.
"""

import os
import tempfile

import pytest
import torch

# Read by ultralytics when it is imported: no network checks, and settings outside the user's home.
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="rewrite-ultralytics-"))
ultralytics = pytest.importorskip("ultralytics")

import rewrite
from rewrite.integrations.ultralytics import rewrite_detection_model, train

# Works today on ultralytics' YOLOv8: its two neck downsampling convs (3x3, stride 2) become GSConvs.
NECK_CONVS = """
[ruleset]
name = "v8-neck-gsconv"
scope = ["model.16", "model.19"]

[[rule]]
name = "conv-to-gsconv"
match.module = ["Conv"]
where.groups = 1
where.same_size = true
where.out_channels = { multiple_of = 2 }
replace.builder = "GSConv"
replace.shuffle = "interleave"
replace.activation = "inherit"
"""

SLIM_NECK_V8 = "slim-neck-v8" in rewrite.builtin_rule_sets()
RULES = [
    pytest.param("inline", id="neck-convs"),
    pytest.param(
        "slim-neck-v8",
        id="slim-neck-v8",
        marks=pytest.mark.skipif(
            not SLIM_NECK_V8, reason="the built-in rule set slim-neck-v8 is not there yet"
        ),
    ),
]


def make_dataset(root, images=4):
    """``images`` train and 2 val images of coloured rectangles on grey, their labels, and the data YAML."""
    from PIL import Image, ImageDraw

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", images), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for index in range(count):
            image = Image.new("RGB", (64, 64), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            lines = []
            for _ in range(2):
                cls = int(torch.randint(0, 2, (), generator=generator))
                x0, y0 = (int(v) for v in torch.randint(2, 30, (2,), generator=generator))
                w, h = (int(v) for v in torch.randint(12, 30, (2,), generator=generator))
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=((220, 40, 40), (40, 40, 220))[cls])
                lines.append(
                    f"{cls} {(x0 + w / 2) / 64:.4f} {(y0 + h / 2) / 64:.4f} {w / 64:.4f} {h / 64:.4f}"
                )
            image.save(root / "images" / split / f"{index}.png")
            (root / "labels" / split / f"{index}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: blue\n")
    return data


@pytest.mark.parametrize("which", RULES)
def test_one_epoch_trains_saves_reloads_and_validates(tmp_path, which):
    rules = rewrite.parse_rules(NECK_CONVS) if which == "inline" else which
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
    assert "GSConv" in blocks
    assert isinstance(reloaded.model.model[16], rewrite.GSConv)
    assert yolo.metrics is not None and "metrics/mAP50(B)" in yolo.metrics.results_dict
    # Validation runs on the reloaded checkpoint too.
    metrics = reloaded.val(
        data=str(data), imgsz=64, batch=2, device="cpu", workers=0, plots=False, verbose=False
    )
    assert set(metrics.results_dict) >= {"metrics/precision(B)", "metrics/mAP50-95(B)"}


def test_a_rule_set_that_rewrites_nothing_fails_before_training(tmp_path):
    nothing = NECK_CONVS.replace('match.module = ["Conv"]', 'match.module = ["C3"]')
    with pytest.raises(rewrite.NoMatchError, match="rewrites nothing in DetectionModel"):
        train(model="yolov8n.yaml", rules=rewrite.parse_rules(nothing), data=str(tmp_path / "missing.yaml"))


def test_the_rewritten_model_keeps_ultralytics_class_and_routing():
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    slim = rewrite_detection_model(model, rewrite.parse_rules(NECK_CONVS), imgsz=64)
    assert type(slim) is DetectionModel and slim.yaml == model.yaml
    assert (slim.model[16].i, slim.model[16].f) == (model.model[16].i, model.model[16].f)
    assert type(model.model[16]).__name__ == "Conv"  # the model given stays as it was
