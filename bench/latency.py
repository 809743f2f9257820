"""Inference latency of slim-neck YOLOv5 next to the base model, both folded, measured side by side in one run.

Both models are built from the zoo (random weights: the arithmetic is the same as with trained ones), folded with
``rewrite.fold`` (BatchNorms into convs, GSConv channel shuffles into the neighbouring weights) and timed in
three modes: eager fp32 (NCHW), eager channels_last, and ONNX Runtime on the CPU (the file ``rewrite.export_onnx``
writes, folded too; all graph optimizations on, sequential execution, ``--threads`` intra-op threads). Per mode the
repetitions are interleaved — base, slim, base, slim, … — so that a slower or faster phase of the machine affects
both alike; the table shows medians and the ratio slim / base, next to the FLOPs ratio. Goal: slim / base <= 0.89
(the FLOPs ratio) in at least one mode and <= 0.93 in every one.

    python bench/latency.py [--model yolov5l] [--size 640] [--repetitions 11] [--threads N] [--clock cpu]
                            [--profile]

``--threads`` sets torch's and ONNX Runtime's thread count (default: torch's default, one per core).
``--clock cpu`` times each run by the process's CPU time instead of the wall clock: with ``--threads 1`` on a
machine that other work keeps busy, that leaves out the time the process waited for a core (with more threads
it would add up the threads' time, spinning included, so it is no latency).
``--profile`` also prints where the time goes per op kind in eager fp32 (convolutions split by kernel, depthwise
apart; SiLU, concatenation, addition, copies), for both models.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import rewrite
from rewrite.zoo import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov5l")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repetitions", type=int, default=11)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--modes", default="eager,channels_last,onnxruntime")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x = torch.rand(1, 3, args.size, args.size)
    base = create_model(args.model).eval()
    plan = rewrite.plan(base, "slim-neck", x)
    slim = plan.apply().eval()
    sources = {"base": base, "slim": slim}
    models = {name: rewrite.fold(model, x) for name, model in sources.items()}
    load_before = os.getloadavg()
    print(
        f"{args.model} slim-neck vs base, 1x3x{args.size}x{args.size}, folded, {args.repetitions} interleaved "
        f"repetitions, medians of {args.clock} time; {os.cpu_count()} cores, {args.threads} threads; "
        f"torch {torch.__version__}; "
        f"load average {load_before[0]:.1f} at the start"
    )
    print(f"FLOPs ratio slim / base: {plan.flops.after / plan.flops.before:.3f}")

    rows = []
    for mode in args.modes.split(","):
        runners = {name: _runner(mode, models[name], sources[name], x, args.threads) for name in models}
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        medians = _interleaved(runners, args.repetitions, clock)
        rows.append((mode, medians["base"], medians["slim"], medians["slim"] / medians["base"]))
        print(f"  {mode:<14} base {medians['base'] * 1e3:8.1f} ms   slim {medians['slim'] * 1e3:8.1f} ms   "
              f"ratio {medians['slim'] / medians['base']:.3f}", flush=True)  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print()
    print("| mode | base ms | slim ms | slim / base |")
    print("|---|---:|---:|---:|")
    for mode, b, s, ratio in rows:
        print(f"| {mode} | {b * 1e3:.1f} | {s * 1e3:.1f} | {ratio:.3f} |")
    if args.profile:
        for name, model in models.items():
            print(f"{name}: {_profile(model, x)}")


def _runner(
    mode: str, model: torch.nn.Module, source: torch.nn.Module, x: torch.Tensor, threads: int
) -> Callable[[], object]:
    """One forward of ``model`` (folded) in ``mode``; ONNX Runtime runs ``source`` as ``export_onnx`` writes it."""
    if mode == "eager":
        return lambda: model(x)
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x_last = x.contiguous(memory_format=torch.channels_last)
        return lambda: model(x_last)
    if mode == "onnxruntime":
        import onnxruntime

        path = Path(tempfile.mkdtemp()) / "model.onnx"
        exported = rewrite.export_onnx(source, x, path)
        print(
            f"    exported {path.stat().st_size / 1e6:.0f} MB, largest relative difference {exported.max_difference:.1e}"
        )
        options = onnxruntime.SessionOptions()
        # The defaults, spelled out so that the figures say what ran: every graph optimization (fusions and the
        # blocked NCHWc layout), one operator at a time on ``threads`` threads.
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        return lambda: session.run(None, feed)
    raise SystemExit(f"unknown mode {mode!r}: eager, channels_last or onnxruntime")


def _interleaved(
    runners: dict[str, Callable[[], object]], repetitions: int, clock: Callable[[], float]
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for run in runners.values():  # warm-up: one-off allocations and kernel choices
            run()
            run()
        for _ in range(repetitions):
            for name, run in runners.items():
                start = clock()
                run()
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _profile(model: torch.nn.Module, x: torch.Tensor) -> str:
    """Self CPU time per op kind for one eager fp32 forward (the fastest of three), in ms."""
    from torch.profiler import ProfilerActivity, profile

    best = None
    with torch.inference_mode():
        model(x)
        for _ in range(3):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                model(x)
            kinds: collections.Counter[str] = collections.Counter()
            for event in prof.events():
                kinds[_kind(event)] += event.self_cpu_time_total / 1e3
            if best is None or sum(kinds.values()) < sum(best.values()):
                best = kinds
    total = sum(best.values())
    parts = ", ".join(f"{kind} {ms:.1f}" for kind, ms in best.most_common() if ms >= 0.005 * total)
    return f"total {total:.1f} ms: {parts}"


def _kind(event: object) -> str:
    name = event.name.removeprefix("aten::")
    # The kernel that ran (mkldnn_convolution, or _slow_conv2d_forward for some 1x1 convs on one thread), not
    # the dispatching calls above it, which would count the same time twice.
    kernel = "conv" in name and name not in ("conv2d", "convolution", "_convolution")
    if kernel and len(event.input_shapes) > 1:
        weight = event.input_shapes[1]
        if len(weight) == 4:
            return f"conv {weight[2]}x{weight[3]}" + (" depthwise" if weight[1] == 1 else "")
    if name in ("silu", "cat", "add", "copy_", "max_pool2d_with_indices", "upsample_nearest2d", "sigmoid"):
        return name
    return "other"


if __name__ == "__main__":
    main()
