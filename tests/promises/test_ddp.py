"""A slim-neck model trains under DistributedDataParallel, and SyncBatchNorm reaches the GS blocks.

The DDP test launches ``examples/train_ddp.py`` with torchrun: 2 CPU processes, gloo, YOLOv5-N at 64x64, two
optimizer steps on synthetic batches (each rank its own), and compares what the ranks wrote.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rewrite
from rewrite.zoo import create_model

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_ddp.py"


def test_two_processes_end_with_the_same_parameters_and_every_parameter_got_a_gradient(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(SCRIPT), "--steps", "2", "--model", "yolov5n", "--imgsz", "64", "--out", str(tmp_path)]
    result = _run(command, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert {r["backend"] for r in ranks} == {"gloo"}
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert len(set(ranks[0]["all_params_sha256"])) == 1
    # Each rank drew its own batches, so their losses differ; the synchronised gradients made the weights equal.
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert all(len(r["losses"]) == 2 and all(math.isfinite(loss) for loss in r["losses"]) for r in ranks)
    # slim-neck on YOLOv5-N: 4 GSConv sites and 4 VoVGSCSP sites, plus the GSConvs inside the VoVGSCSPs.
    gs = ranks[0]["gs_blocks"]
    assert {"model.10", "model.13", "model.21", "model.23"} <= set(gs)
    assert all(r["without_grad"] == [] for r in ranks)
    assert "parameters after 2 step(s): identical on all 2 ranks" in result.stdout
    assert f"through all {len(gs)} GS blocks" in result.stdout


def test_sync_batchnorm_converts_every_batchnorm_of_the_gs_blocks():
    model = create_model("yolov5n", nc=3).eval()
    slim = rewrite.apply(model, "slim-neck", torch.zeros(1, 3, 64, 64))
    gs_blocks = [name for name, m in slim.named_modules() if isinstance(m, rewrite.GSConv | rewrite.VoVGSCSP)]
    norms_before = {
        name for name, m in slim.named_modules() if isinstance(m, nn.BatchNorm2d) and _inside(name, gs_blocks)
    }

    synced = nn.SyncBatchNorm.convert_sync_batchnorm(slim)

    kinds = {name: type(m) for name, m in synced.named_modules() if _inside(name, gs_blocks)}
    assert norms_before and all(kinds[name] is nn.SyncBatchNorm for name in norms_before)
    assert not any(kind is nn.BatchNorm2d for kind in kinds.values())
    assert type(synced.model[13]) is rewrite.VoVGSCSP  # the blocks themselves stay what they are


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm runs its forward on GPUs only")
def test_sync_batchnorm_trains_a_step_on_a_gpu(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    command += [str(SCRIPT), "--steps", "1", "--imgsz", "64", "--out", str(tmp_path)]
    result = _run(command, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank = json.loads((tmp_path / "rank0.json").read_text(encoding="utf-8"))
    assert rank["backend"] == "nccl" and rank["sync_batchnorm"] > 0 and rank["without_grad"] == []


def _inside(name: str, paths: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in paths)


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run torchrun in a session of its own, so that a timeout ends its workers too, not only torchrun."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _env() -> dict[str, str]:
    # One thread per process: two processes on a 2-core machine, without oversubscribing it.
    return {**os.environ, "OMP_NUM_THREADS": "1"}
