"""Training-step time of slim-neck detectors next to their bases, and what channels-last depthwise convs give.

For each model (ultralytics' YOLOv8n with ``slim-neck-v8``, YOLOv5nu with ``slim-neck``; 6 classes), three
variants take turns, forward and backward of a whole training step on the same batch, interleaved, medians:

* ``base``: the model as ultralytics builds it;
* ``slim, NCHW depthwise``: the slim-neck copy with its depthwise convs as plain ``nn.Conv2d`` (before);
* ``slim``: the slim-neck copy as ``rewrite`` builds it (``rewrite.blocks.DepthwiseConv2d``: channels-last where
  gradients flow on a CPU).

    python bench/train_speed.py [--batch 16] [--imgsz 128] [--repetitions 7] [--threads N] [--profile]

``--threads`` sets torch's threads (default: its own choice, one per core); more threads than cores is what a
training step meets when data-loading workers or other jobs share the cores.

``--profile`` adds the ten ops with the most self CPU time per variant (torch.profiler, three steps each).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from ultralytics.nn.tasks import DetectionModel

from rewrite.blocks import DepthwiseConv2d
from rewrite.integrations.ultralytics import rewrite_detection_model

MODELS = {"YOLOv8n": ("yolov8n.yaml", "slim-neck-v8"), "YOLOv5nu": ("yolov5nu.yaml", "slim-neck")}


def training_step(model: nn.Module, batch: torch.Tensor) -> None:
    """Forward in train mode, a loss touching every output, backward; the gradients are dropped after."""
    outputs = model(batch)
    loss = sum(
        value.float().square().mean() for value in tree_leaves(outputs) if isinstance(value, torch.Tensor)
    )
    loss.backward()
    model.zero_grad(set_to_none=True)


def with_plain_depthwise(model: nn.Module) -> nn.Module:
    """A copy whose depthwise convs are plain ``nn.Conv2d`` again (the same weights)."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if type(module) is DepthwiseConv2d:
            module.__class__ = nn.Conv2d
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = torch.rand(args.batch, 3, args.imgsz, args.imgsz)
    print(
        f"batch {args.batch}x3x{args.imgsz}x{args.imgsz}, {torch.get_num_threads()} threads, "
        f"{args.repetitions} interleaved repetitions, medians"
    )
    for name, (yaml, rules) in MODELS.items():
        base = DetectionModel(yaml, nc=6, verbose=False).train()
        slim = rewrite_detection_model(base, rules, imgsz=args.imgsz).train()
        variants = {"base": base, "slim, NCHW depthwise": with_plain_depthwise(slim), "slim": slim}
        times: dict[str, list[float]] = {label: [] for label in variants}
        for model in variants.values():
            training_step(model, batch)  # warm-up: allocator, kernels chosen
        for _ in range(args.repetitions):
            for label, model in variants.items():
                start = time.perf_counter()
                training_step(model, batch)
                times[label].append(time.perf_counter() - start)
        base_time = statistics.median(times["base"])
        print(f"\n{name} with {rules} (load average {os.getloadavg()[0]:.1f})")
        for label, values in times.items():
            median = statistics.median(values)
            print(f"  {label:<22} {median * 1000:8.0f} ms   / base {median / base_time:.3f}")
        if args.profile:
            for label, model in variants.items():
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                    for _ in range(3):
                        training_step(model, batch)
                print(f"\n  {label}: self CPU time per op over 3 steps")
                print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
