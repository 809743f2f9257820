"""How much one ``profile()`` of YOLOv5-L costs next to one eager forward of it (CPU, batch 1, 640x640).

Measured side by side in one run: the repetitions are interleaved (forward, profile of the CPU model, profile of
the meta model, then again), so that a slower or faster phase of the machine affects all three alike; medians.
The profiles resolve their stages themselves, as a caller's would. Goal: profile / forward <= 0.3.

    python bench/profile_speed.py [repetitions]      (default 7)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

from rewrite.profiler import profile
from rewrite.zoo import create_model


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(repetitions: int = 7) -> None:
    torch.manual_seed(0)
    model = create_model("yolov5l").eval()
    x = torch.randn(1, 3, 640, 640)
    with torch.device("meta"):
        meta_model = create_model("yolov5l").eval()
    meta_x = x.to("meta")

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    cases = {
        "eager forward (CPU, inference mode)": forward,
        "profile(), model on CPU": lambda: profile(model, (x,)),
        "profile(), model and input on meta": lambda: profile(meta_model, (meta_x,)),
    }
    for fn in cases.values():  # warm-up: first calls pay for lazy imports and allocator growth
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repetitions):
        for name, fn in cases.items():
            times[name].append(seconds(fn))

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"YOLOv5-L, 1x3x640x640, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{repetitions} interleaved repetitions, medians"
    )
    for name, median in medians.items():
        print(
            f"  {name:<40} {median * 1000:9.1f} ms   (min {min(times[name]) * 1000:.1f}, "
            f"max {max(times[name]) * 1000:.1f})"
        )
    forward_s = medians["eager forward (CPU, inference mode)"]
    print(f"  ratio profile(CPU model) / forward       {medians['profile(), model on CPU'] / forward_s:9.3f}")
    meta_s = medians["profile(), model and input on meta"]
    print(f"  ratio profile(meta model) / forward      {meta_s / forward_s:9.3f}")
    print("  goal: ratio <= 0.3")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
