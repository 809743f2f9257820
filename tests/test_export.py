"""rewrite.export_onnx and `rewrite export`: folded, exported, and checked against PyTorch with ONNX Runtime."""

import textwrap

import onnx
import pytest
import torch

import rewrite
from rewrite.blocks import GSConv
from rewrite.cli import main
from rewrite.zoo import create_model

pytest.importorskip("onnxruntime")


def test_yolov5n_slim_neck_matches_pytorch_at_batch_1_and_2(tmp_path):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    slim = rewrite.apply(create_model("yolov5n").eval(), "slim-neck", x)
    exported = rewrite.export_onnx(slim, x, tmp_path / "slim.onnx", dynamic_batch=True)
    assert sorted(exported.differences) == [1, 2]
    assert exported.max_difference < 1e-4
    graph = onnx.load(str(tmp_path / "slim.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "BatchNormalization" not in ops and "Gather" not in ops  # folded: no BN, no shuffle left
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch is a named free dimension
    assert [p.name for p in tmp_path.iterdir()] == ["slim.onnx"]  # no temporary file left behind


class DictOfImages(torch.nn.Module):
    """A forward that takes its images in a dict, as detection training code often does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(GSConv(3, 8, 3), torch.nn.Conv2d(8, 4, 1))

    def forward(self, batch):
        return self.conv(batch["image"]) * batch["scale"]


def test_a_forward_taking_a_dict_exports_it_as_its_tensors(tmp_path):
    batch = {"image": torch.rand(1, 3, 16, 16), "scale": torch.full((1, 1, 1, 1), 2.0)}
    exported = rewrite.export_onnx(
        DictOfImages().eval(), (batch,), tmp_path / "dict.onnx", dynamic_batch=True
    )
    assert sorted(exported.differences) == [1, 2]
    assert exported.max_difference < 1e-4
    assert [i.name for i in onnx.load(str(tmp_path / "dict.onnx")).graph.input] == ["input_0", "input_1"]


def test_export_command_on_a_model_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.py").write_text(
        textwrap.dedent(
            """\
            from torch import nn
            from rewrite.blocks import GSConv

            def build(width=16):
                return nn.Sequential(GSConv(3, width, 3, 2), GSConv(width, width), nn.Conv2d(width, 4, 1))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    code = main(
        ["export", "tiny.py:build", "--input", "1,3,32,32", "--output", "out/", "--dynamic-batch", "-q"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("wrote out/model.onnx (") and "batch 1: " in captured.out
    assert "batch 2: " in captured.out
    assert (tmp_path / "out" / "model.onnx").is_file()

    monkeypatch.setattr("rewrite.export._difference", lambda *args: 3e-4)  # as if ONNX Runtime were off
    code = main(["export", "tiny.py:build", "--input", "1,3,32,32", "--output", "m.onnx", "-q"])
    assert code == 1  # the parity gate fails; the file is still written
    assert "ONNX parity check failed: 3.00e-04 > --tolerance 0.0001" in capsys.readouterr().err
    assert (tmp_path / "m.onnx").is_file()
