"""How close a warm start brings slim-neck YOLOv5-S to the original, and how long it takes (CPU).

The original is the zoo's YOLOv5-S (seed 0, no download), or, with ``--weights``, the zoo model with a local
YOLOv5-S state dict loaded (the zoo's keys are those of the public checkpoints). Freshly initialised, its
BatchNorm layers hold the default statistics (mean 0, variance 1), under which a random network's features fade
to ~1e-9 by the neck: no trained detector looks like that. So a random original first gets BatchNorm statistics
of the images themselves — the one thing training gives a network that does not need labels. Mind what a random
original measures: a GSConv computes half its channels with a depthwise conv of the other half, so it cannot
reproduce a conv whose output channels are independent random projections (a trained conv's are not: that
redundancy is what GSConv is built on); the errors there have a floor well above zero. Then slim-neck rewrites it, and
``rewrite.warm_start`` starts each new block from the replaced module's weights where it can (the GS blocks'
``warm_start_from``) and trains the new blocks on the original's outputs, from the 64 generated images (coloured
rectangles on noise) alone. The defaults are the budget measured to do most in two minutes: no site-by-site
steps (on this random original they cost more time than they gain), then all new blocks together with the
unchanged head behind them (``end_to_end_downstream``; ``--blocks-only`` leaves the head as it was) for 100
seconds of steps (``end_to_end_seconds``: as many steps as the machine manages, the learning rate held for
70 % of the time, then decayed linearly to zero; ``--end-to-end-steps N`` caps them, or with
``--end-to-end-seconds 0`` fixes them) at a learning rate of 6e-4 (chosen under a cosine decay: at 80 steps 3e-4
did better, at 400 or more 6e-4 did better than 1e-3 or 1.6e-3, 8e-4 the same),
their forward passes in bfloat16 autocast (``--float32`` turns it off; on this CPU, with AVX-512 BF16, a step is
about a quarter faster so). The passes before and after the steps (recording the original, the errors, the
copies) take another 10-15 s. Printed: the per-site table, the whole model's relative L2 output difference
before → after (every tensor of the eval output: decoded boxes and raw maps), the wall time, the machine load.

Goal (issue 11): after <= 2 minutes on a 2-core CPU, the whole-model difference at most a fifth of before.

    python bench/warm_start.py [--steps 0] [--end-to-end-seconds 100] [--end-to-end-steps 0] [--blocks-only]
                               [--imgsz 256] [--images 64] [--batch 8]
                               [--float32] [--weights yolov5s.pt]

Mind what the whole-model figure weighs: the decoded boxes are in pixels, so their centres (grid position times
stride) make up nearly all of the reference norm, and the anchor-scaled widths and heights nearly all of the
difference: before the warm start mostly those of the coarsest level (72 %), after it those of the two finer ones
(37 % and 32 %); scores and raw maps barely count.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

import rewrite
from rewrite.zoo import create_model


def generated_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` images of 1-4 coloured rectangles on a noisy grey background, values in [0, 1]."""
    images = 0.5 + 0.1 * torch.randn(count, 3, size, size, generator=generator)
    for image in images:
        for _ in range(int(torch.randint(1, 5, (), generator=generator))):
            x0, y0 = (int(v) for v in torch.randint(0, size * 3 // 4, (2,), generator=generator))
            w, h = (int(v) for v in torch.randint(size // 8, size // 3, (2,), generator=generator))
            image[:, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=generator)
    return images.clamp_(0, 1)


def estimate_batchnorm_statistics(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Set every BatchNorm's running statistics to their plain average over ``batches`` (no weight changes)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov5s")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per site")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--end-to-end-steps", type=int, default=0, help="most steps of all new blocks together (0: no cap)"
    )
    parser.add_argument(
        "--end-to-end-seconds", type=float, default=100.0, help="time for those steps (0: no time limit)"
    )
    parser.add_argument("--end-to-end-lr", type=float, default=6e-4)
    parser.add_argument(
        "--blocks-only",
        action="store_true",
        help="train only the new blocks end to end, not the unchanged head behind them",
    )
    parser.add_argument(
        "--float32", action="store_true", help="no bfloat16 autocast in the end-to-end phase (slower here)"
    )
    parser.add_argument("--weights", type=Path, help="a local state dict for the zoo model (no download)")
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = generated_images(args.images, args.imgsz, generator)
    batches = list(images.split(args.batch))
    original = create_model(args.model)
    if args.weights is not None:
        original.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        original.eval()
    else:
        estimate_batchnorm_statistics(original, batches)
    slim = rewrite.apply(original, "slim-neck", torch.zeros(1, 3, args.imgsz, args.imgsz))

    print(
        f"{args.model}, slim-neck, {args.images} generated images at {args.imgsz}x{args.imgsz} in batches of "
        f"{args.batch}, {args.steps} steps per site, then together for {args.end_to_end_seconds:g} s / {args.end_to_end_steps} steps, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), load average before {os.getloadavg()[0]:.2f}"
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    report = rewrite.warm_start(
        slim,
        original,
        batches,
        steps=args.steps,
        lr=args.lr,
        end_to_end_steps=args.end_to_end_steps,
        end_to_end_seconds=args.end_to_end_seconds or None,
        end_to_end_lr=args.end_to_end_lr,
        end_to_end_downstream=not args.blocks_only,
        bfloat16=not args.float32,
        progress=print,
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    print()
    print(report)
    ratio = report.model_after / report.model_before
    print(
        f"\nwhole model: {report.model_before:.4f} → {report.model_after:.4f} (× {ratio:.3f}; goal ≤ 0.2) in "
        f"{seconds:.1f} s wall (goal ≤ 120 s), {cpu_seconds:.1f} s of CPU time; load average after "
        f"{os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
