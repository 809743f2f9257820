"""Shape propagation on meta stand-ins (what ``rewrite`` does) next to fx's ``FakeTensorProp``, measured side by side.

Issue 12 asked whether running shape propagation under ``torch._subclasses.FakeTensorMode`` would be better than
swapping meta stand-ins into the model's modules and restoring them. Three measurements, printed as a table:

1. **Time** on YOLOv5-L at 640 (zoo, real weights on the CPU): ``rewrite.trace`` with shapes (the meta run)
   against ``rewrite.trace`` without shapes plus ``FakeTensorProp`` over each traced region (medians of
   ``--repetitions`` interleaved runs).
2. **Memory** of a 10-billion-parameter model built on the meta device: the peak resident memory of a child
   process that plans it with ``rewrite.plan`` (the meta run), and of one that runs ``FakeTensorProp`` on its
   trace.
3. **The model left as it was**: a module whose forward updates a buffer in place (``self.steps += 1``) and
   branches on its input's values, run under ``FakeTensorMode`` as FakeTensorProp would run an opaque module,
   and run by ``rewrite.trace``: the buffer's value afterwards, and whether the run got through.

    python bench/fake_tensor_prop.py [--repetitions 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from tabulate import tabulate
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import rewrite
from rewrite.zoo import create_model

# A stack of 3x3 convs, 10.07e9 parameters in all, built on meta (it would need 40 GB as fp32 weights).
HUGE = """
import resource, sys, torch
from torch import nn
import rewrite
with torch.device("meta"):
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(8192, 8192, 3, padding=1), nn.BatchNorm2d(8192), nn.SiLU())
                            for _ in range(17)])
x = torch.zeros(1, 8192, 8, 8, device="meta")
if sys.argv[1] == "meta":
    plan = rewrite.plan(model, "gsconv-only", x, scope="backbone")
    print(plan.params.before, end=" ")
else:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    traced = rewrite.trace(model, x, propagate_shapes=False)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(traced.regions[0].graph_module, mode).propagate(mode.from_tensor(x))
    print(sum(p.numel() for p in model.parameters()), end=" ")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


class CountsSteps(nn.Module):
    """A forward that counts its calls in a buffer and branches on its input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        return self.conv(x) if x.mean() > 0 else -self.conv(x)


def fake_propagate(traced: rewrite.Traced, inputs: tuple) -> None:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for region in traced.regions[:1]:  # the root's graph: YOLOv5's root traces, only Detect is opaque
        FakeTensorProp(region.graph_module, mode).propagate(*(mode.from_tensor(x) for x in inputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    rows = []

    model = create_model("yolov5l").eval()
    x = (torch.zeros(1, 3, 640, 640),)
    times: dict[str, list[float]] = {"meta": [], "fake": []}
    for _ in range(args.repetitions):
        start = time.perf_counter()
        rewrite.trace(model, x)
        times["meta"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fake_propagate(rewrite.trace(model, x, propagate_shapes=False), x)
        times["fake"].append(time.perf_counter() - start)
    meta_s, fake_s = statistics.median(times["meta"]), statistics.median(times["fake"])
    rows.append(("yolov5l trace + shapes, s", f"{meta_s:.2f}", f"{fake_s:.2f}", f"{fake_s / meta_s:.2f}"))

    memory = {}
    for how in ("meta", "fake"):
        out = subprocess.run(
            [sys.executable, "-c", HUGE, how], capture_output=True, text=True, check=True
        ).stdout
        params, megabytes = out.split()
        memory[how] = int(megabytes)
    rows.append(
        (
            f"{int(params) / 1e9:.2f}e9-param model, peak RSS MB",
            memory["meta"],
            memory["fake"],
            f"{memory['fake'] / memory['meta']:.2f}",
        )
    )

    probe = CountsSteps()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            probe(torch.randn(1, 3, 8, 8))
        fake_outcome = "ran"
    except Exception as error:  # noqa: BLE001 -- the outcome is what we measure
        fake_outcome = type(error).__name__
    fake_steps = float(probe.steps)
    probe = CountsSteps()
    rewrite.trace(probe, torch.randn(1, 3, 8, 8))
    rows.append(
        (
            "in-place buffer: steps after one run (was 0)",
            f"{float(probe.steps):g} (ran)",
            f"{fake_steps:g} ({fake_outcome})",
            "",
        )
    )
    print(tabulate(rows, headers=("measure", "meta stand-ins (today)", "FakeTensorProp", "fake / meta")))
    print(f"\n{args.repetitions} interleaved repetitions; torch {torch.__version__}")


if __name__ == "__main__":
    main()
