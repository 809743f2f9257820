"""Inference latency of slim-neck YOLOv5 next to the base model, both folded, measured side by side in one run.

Both models are built from the zoo (random weights: the arithmetic is the same as with trained ones), folded with
``rewrite.fold`` (BatchNorms into convs, GSConv channel shuffles into the neighbouring weights) and timed in
three modes: eager fp32 (NCHW), eager channels_last, and ONNX Runtime on the CPU (the file ``rewrite.export_onnx``
writes, folded too; all graph optimizations on, sequential execution, ``--threads`` intra-op threads). Per mode the
repetitions are interleaved — base, slim, base, slim, … — so that a slower or faster phase of the machine affects
both alike; the table shows medians and the ratio slim / base, next to the FLOPs ratio, and the spread of the
ratio over the repetitions: the quartiles of slim / base taken pair by pair (each slim run over the base run just
before it). On a shared machine that spread is the honest error bar of the median. Goal: slim / base <= 0.89
(the FLOPs ratio) in at least one mode and <= 0.93 in every one.

    python bench/latency.py [--model yolov5l] [--size 640] [--repetitions 11] [--threads N] [--clock cpu]
                            [--modes eager,channels_last,onnxruntime] [--profile]

``--threads`` sets torch's and ONNX Runtime's thread count (default: torch's default, one per core).
``--clock cpu`` times each run by the process's CPU time instead of the wall clock: with ``--threads 1`` on a
machine that other work keeps busy, that leaves out the time the process waited for a core (with more threads
it would add up the threads' time, spinning included, so it is no latency).
``--profile`` also prints where the time goes per op kind, for both models, in eager fp32 and in ONNX Runtime
(its own profiler): convolutions split by kernel, depthwise apart, each with its FLOPs and the rate it ran at
(GFLOP/s); SiLU, concatenation, addition, copies; per model the median of each kind over ``--repetitions``
profiled runs, interleaved like the timed ones. The slim model moves FLOPs from 3x3 to 1x1 convolutions; the
rates say what that costs. The last lines set the dense convolutions' time ratio next to their FLOPs ratio, and
give the bound that follows: slim / base with the slim model's dense convs at the base's rate per FLOP and
everything else as measured.
"""

from __future__ import annotations

import argparse
import collections
import json
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
        times = _interleaved(runners, args.repetitions, clock)
        base, slim = statistics.median(times["base"]), statistics.median(times["slim"])
        low, _, high = statistics.quantiles([s / b for b, s in zip(times["base"], times["slim"])], n=4)
        rows.append((mode, base, slim, slim / base, low, high))
        print(f"  {mode:<14} base {base * 1e3:8.1f} ms   slim {slim * 1e3:8.1f} ms   ratio {slim / base:.3f}"
              f"   pairwise quartiles {low:.3f} - {high:.3f}", flush=True)  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print()
    print("| mode | base ms | slim ms | slim / base | quartiles of slim / base per pair |")
    print("|---|---:|---:|---:|---:|")
    for mode, b, s, ratio, low, high in rows:
        print(f"| {mode} | {b * 1e3:.1f} | {s * 1e3:.1f} | {ratio:.3f} | {low:.3f} - {high:.3f} |")
    if args.profile:
        flops = {name: _conv_flops(model, x) for name, model in models.items()}
        profiles = {
            "eager": _eager_profiles(models, x, args.repetitions),
            "onnxruntime": _onnxruntime_profiles(sources, x, args.threads, args.repetitions),
        }
        for profiler, kinds in profiles.items():
            for name in models:
                print(f"{name}, {profiler}: {_format_kinds(kinds[name], flops[name])}")
        # The bound the goal runs into: what slim / base would be with the slim model's dense convs at the base's
        # rate per FLOP and everything else as measured.
        dense_flops = _dense_conv(flops["slim"]) / _dense_conv(flops["base"])
        print(f"dense convs, slim / base: FLOPs {dense_flops:.3f}")
        for profiler, kinds in profiles.items():
            dense = {name: _dense_conv(kinds[name]) for name in models}
            total = {name: sum(kinds[name].values()) for name in models}
            rest = {name: total[name] - dense[name] for name in models}
            bound = (dense_flops * dense["base"] + rest["slim"]) / total["base"]
            print(
                f"  {profiler}: time {dense['slim'] / dense['base']:.3f}; everything else base {rest['base']:.1f} ms, "
                f"slim {rest['slim']:.1f} ms; slim / base with conv rates at parity: {bound:.3f}"
            )


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

        session = _onnxruntime_session(source, x, onnxruntime.SessionOptions(), threads, verbose=True)
        feed = {session.get_inputs()[0].name: x.numpy()}
        return lambda: session.run(None, feed)
    raise SystemExit(f"unknown mode {mode!r}: eager, channels_last or onnxruntime")


def _interleaved(
    runners: dict[str, Callable[[], object]], repetitions: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
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
    return times


def _eager_profiles(
    models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int
) -> dict[str, collections.Counter[str]]:
    """Self CPU time per op kind of one eager fp32 forward, in ms: per model the median over ``rounds`` runs,
    interleaved between the models like the timed repetitions."""
    from torch.profiler import ProfilerActivity, profile

    runs: dict[str, list[collections.Counter[str]]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for _ in range(rounds):
            for name, model in models.items():
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    model(x)
                kinds: collections.Counter[str] = collections.Counter()
                for event in prof.events():
                    kinds[_eager_kind(event)] += event.self_cpu_time_total / 1e3
                runs[name].append(kinds)
    return {name: _median_kinds(counters) for name, counters in runs.items()}


def _eager_kind(event: object) -> str:
    name = event.name.removeprefix("aten::")
    # The kernel that ran (mkldnn_convolution, or _slow_conv2d_forward for some 1x1 convs on one thread), not
    # the dispatching calls above it, which would count the same time twice.
    kernel = "conv" in name and name not in ("conv2d", "convolution", "_convolution")
    if kernel and len(event.input_shapes) > 1 and len(event.input_shapes[1]) == 4:
        weight = event.input_shapes[1]
        return _conv_kind(weight[2], weight[3], depthwise=weight[1] == 1)
    if name in ("silu", "cat", "add", "copy_", "max_pool2d_with_indices", "upsample_nearest2d", "sigmoid"):
        return name
    return "other"


def _onnxruntime_profiles(
    sources: dict[str, torch.nn.Module], x: torch.Tensor, threads: int, rounds: int
) -> dict[str, collections.Counter[str]]:
    """Kernel time per op kind in ONNX Runtime (its profiler), in ms, of the files ``rewrite.export_onnx`` writes:
    per model the median over ``rounds`` runs after one warm-up, interleaved between the models."""
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="latency-profile-") as directory:
        sessions = {}
        for name, source in sources.items():
            options = onnxruntime.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(directory) / name)
            sessions[name] = _onnxruntime_session(source, x, options, threads)
        feeds = {name: {session.get_inputs()[0].name: x.numpy()} for name, session in sessions.items()}
        for _ in range(1 + rounds):
            for name, session in sessions.items():
                session.run(None, feeds[name])
        events = {
            name: json.loads(Path(session.end_profiling()).read_text()) for name, session in sessions.items()
        }
    return {name: _median_kinds(_onnxruntime_runs(model_events)[1:]) for name, model_events in events.items()}


def _onnxruntime_runs(events: list[dict]) -> list[collections.Counter[str]]:
    """Kernel time per op kind of each run in an ONNX Runtime profile, in ms, in the order they ran."""
    runs = sorted(
        (event["ts"], event["ts"] + event["dur"]) for event in events if event.get("name") == "model_run"
    )
    kinds: list[collections.Counter[str]] = [collections.Counter() for _ in runs]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op, shapes = event["args"]["op_name"], event["args"].get("input_type_shape", [])
        if op == "Conv" and len(shapes) > 1:
            weight = next(iter(shapes[1].values()))
            op = _conv_kind(weight[2], weight[3], depthwise=weight[1] == 1)
        run = next(i for i, (start, end) in enumerate(runs) if start <= event["ts"] <= end)
        kinds[run][op] += event["dur"] / 1e3
    return kinds


def _median_kinds(runs: list[collections.Counter[str]]) -> collections.Counter[str]:
    kinds = set().union(*runs)
    return collections.Counter({kind: statistics.median(run[kind] for run in runs) for kind in kinds})


def _onnxruntime_session(
    source: torch.nn.Module, x: torch.Tensor, options: object, threads: int, *, verbose: bool = False
) -> object:
    """An ONNX Runtime CPU session of the file ``rewrite.export_onnx`` writes for ``source`` (folded), exported
    to a temporary folder that is gone once the session has read it."""
    import onnxruntime

    # The defaults, spelled out so that the figures say what ran: every graph optimization (fusions and the
    # blocked NCHWc layout), one operator at a time on ``threads`` threads.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory(prefix="latency-") as directory:
        path = Path(directory) / "model.onnx"
        exported = rewrite.export_onnx(source, x, path)
        if verbose:
            print(
                f"    exported {path.stat().st_size / 1e6:.0f} MB, largest relative difference "
                f"{exported.max_difference:.1e}"
            )
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _conv_kind(height: int, width: int, *, depthwise: bool) -> str:
    return f"conv {height}x{width}" + (" depthwise" if depthwise else "")


def _conv_flops(model: torch.nn.Module, x: torch.Tensor) -> collections.Counter[str]:
    """FLOPs per conv kind in one forward of ``model``, as ``rewrite.profile`` counts them for the reports."""
    costs = rewrite.profile(model, x).modules
    flops: collections.Counter[str] = collections.Counter()
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and path in costs:
            depthwise = module.groups > 1 and module.groups == module.in_channels
            flops[_conv_kind(*module.kernel_size, depthwise=depthwise)] += costs[path].flops
    return flops


def _dense_conv(kinds: collections.Counter[str]) -> float:
    return sum(value for kind, value in kinds.items() if kind.startswith("conv") and "depthwise" not in kind)


def _format_kinds(kinds: collections.Counter[str], flops: collections.Counter[str]) -> str:
    total = sum(kinds.values())
    parts = []
    for kind, ms in kinds.most_common():
        if ms < 0.005 * total:
            continue
        rate = (
            f" ({flops[kind] / 1e9:.1f} GFLOP at {flops[kind] / ms / 1e6:.0f} GFLOP/s)" if flops[kind] else ""
        )
        parts.append(f"{kind} {ms:.1f}{rate}")
    return f"total {total:.1f} ms: " + ", ".join(parts)


if __name__ == "__main__":
    main()
