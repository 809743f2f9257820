"""How the cost of ``rewrite.plan`` grows with the model: time per rewritten site, the growth from 250 to 2000
sites, peak memory, YOLOv5-L's main job and a net of a trillion parameters on meta.

The synthetic nets are ``N`` blocks of conv(64→64, 3x3) → BatchNorm → SiLU in one ``nn.Sequential``, built on
the meta device (no weights), input 1x64x32x32, planned with a one-rule GSConv chain rule (below) that
rewrites every block: ``N`` sites. Each configuration runs in a fresh process (``--one``), so that its peak
resident memory (``ru_maxrss``) is its own; the plan's phases (trace, match, build and rewrite, measure, shape
check) are timed by wrapping the planner's steps, and the same process first imports the library (torch
included) so that the import is timed too. YOLOv5-L's main job is ``rewrite plan yolov5l --rules slim-neck``
as a user runs it, timed from outside (one process, import included), and its split measured in a second
process. The large nets are blocks of 4096 channels (about 100 B parameters) and 16384 channels (about 1 T
parameters), on meta.

Goals (issue 24): at most 5 ms per site at N = 2000, time(2000) / time(250) at most 8.5; YOLOv5-L's main job
at most 3.5 s; 1 T parameters planned on meta in under 60 s and 2 GB.

The machine is shared: times are CPU seconds of the planning process (``time.process_time``: what other
users' load changes least), the wall time beside them, and each line carries the 1-minute load average.

With ``--against CHECKOUT`` every configuration runs by turns with that checkout's code (before: first on
``PYTHONPATH``, same interpreter and packages) and this one's (after), ``--repeat`` times each, and the medians
are printed side by side: on a busy machine, only figures measured together compare. The main job then runs
as ``python -m rewrite`` for both.

    python bench/plan_speed.py [--sizes 250 1000 2000 4000] [--skip-yolo] [--skip-large]
                               [--against CHECKOUT] [--repeat K]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RULES = """
[ruleset]
name = "chain-gsconv"
description = "every conv -> BatchNorm -> activation chain becomes a GSConv"

[[rule]]
name = "conv-to-gsconv"
match.chain = ["Conv2d", "BatchNorm2d?", "activation?"]
where.groups = 1
where.same_size = true
replace.builder = "GSConv"
replace.activation = "inherit"
"""

# What each phase of a plan is made of: the planner's names for its steps (wrapped with a timer).
PHASES = {
    "trace": ["trace", "resolve_stages", "resolve_scope"],
    "match": ["find_matches"],
    "build": ["build_sites", "_refuse_frozen", "absorb_into_graph_regions", "rewrite_model"],
    "measure": ["profile", "profile_and_outputs", "_measure_site"],
    "shape check": ["check_outputs"],
}


# (blocks, channels): 105.7 B and 1.0 T parameters (a block holds 9 c² conv weights and 2 c of BatchNorm)
LARGE = ((700, 4096), (414, 16384))


def chain_net(blocks: int, channels: int):
    import torch
    from torch import nn

    with torch.device("meta"):
        return nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(channels),
                    nn.SiLU(),
                )
                for _ in range(blocks)
            )
        )


def timed_plan(model, rules, inputs) -> dict:
    """Plan ``model``: the CPU and wall time of the whole, the CPU time of each phase (seconds), the sites."""
    from rewrite import planner

    spent = dict.fromkeys(PHASES, 0.0)
    running = []  # the phase being timed: a step called inside another (a profile inside a measure) is not
    originals = {}
    for phase, names in PHASES.items():
        for name in names:
            if not hasattr(planner, name):
                continue
            originals[name] = function = getattr(planner, name)

            def timed(*args, _function=function, _phase=phase, **kwargs):
                if running:
                    return _function(*args, **kwargs)
                running.append(_phase)
                start = time.process_time()
                try:
                    return _function(*args, **kwargs)
                finally:
                    spent[_phase] += time.process_time() - start
                    running.pop()

            setattr(planner, name, timed)
    try:
        start, start_cpu = time.perf_counter(), time.process_time()
        plan = planner.plan(model, rules, inputs)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    finally:
        for name, function in originals.items():
            setattr(planner, name, function)
    sites, params = len(plan.sites), plan.params.before
    return {"plan": cpu, "wall": wall, "phases": spent, "sites": sites, "params": params}


def one(kind: str, blocks: int, channels: int) -> dict:
    """One configuration, in this process: what ``--one`` prints."""
    start = time.process_time()
    import torch

    from rewrite.rules import parse_rules
    from rewrite.zoo import create_model

    imported = time.process_time() - start
    if kind == "yolov5l":
        result = timed_plan(create_model("yolov5l").eval(), "slim-neck", torch.zeros(1, 3, 640, 640))
    else:  # the large nets on a smaller map: on meta, shapes cost the same whatever their size
        side = 32 if channels == 64 else 8
        model = chain_net(blocks, channels)
        result = timed_plan(model, parse_rules(RULES, "plan_speed.py"), torch.zeros(1, channels, side, side))
    result["import"] = imported
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["load"] = os.getloadavg()[0]
    return result


REPO = Path(__file__).resolve().parents[1]


def in_tree(tree: Path, command: list[str]) -> subprocess.CompletedProcess:
    """``command`` run with ``tree``'s ``rewrite`` (first on the path, and the working directory)."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(command, check=True, capture_output=True, text=True, cwd=tree, env=environment)


def in_subprocess(tree: Path, kind: str, blocks: int = 0, channels: int = 0) -> dict:
    """One configuration in a fresh process, with ``tree``'s code."""
    output = in_tree(tree, [sys.executable, __file__, "--one", kind, str(blocks), str(channels)]).stdout
    return json.loads(output.strip().splitlines()[-1])


def cli_time(tree: Path) -> dict:
    """The wall and CPU time of ``rewrite plan yolov5l --rules slim-neck`` as a user runs it (with ``tree``'s
    code), and the load average."""
    command = [sys.executable, "-m", "rewrite", "plan", "yolov5l", "--rules", "slim-neck", "-q"]
    start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    in_tree(tree, command)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return {"wall": time.perf_counter() - start, "cpu": cpu, "load": os.getloadavg()[0]}


def medians(runs: list[dict]) -> dict:
    """Each figure's median over repeated runs of one configuration (the phases' one by one)."""
    result = dict(runs[-1])
    for key, value in runs[0].items():
        if isinstance(value, float):
            result[key] = statistics.median(run[key] for run in runs)
        elif isinstance(value, dict):
            result[key] = {name: statistics.median(run[key][name] for run in runs) for name in value}
    return result


def alternating(trees: dict[str, Path], repeat: int, measure: Callable[[Path], dict]) -> dict[str, dict]:
    """``measure(tree)`` for each tree in turn, ``repeat`` rounds (so that a change in the machine's load
    falls on every tree alike), and each tree's medians."""
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(repeat):
        for name, tree in trees.items():
            runs[name].append(measure(tree))
    return {name: medians(results) for name, results in runs.items()}


def split(result: dict) -> str:
    phases = ", ".join(f"{name} {seconds:.2f}" for name, seconds in result["phases"].items())
    other = result["plan"] - sum(result["phases"].values())
    return f"import {result['import']:.2f}, {phases}, other {other:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 2000, 4000])
    parser.add_argument("--skip-yolo", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument(
        "--against",
        metavar="CHECKOUT",
        help="a checkout of the code to compare with (run by this interpreter), measured by turns with this one",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration per tree (medians)")
    parser.add_argument("--one", nargs=3, metavar=("KIND", "BLOCKS", "CHANNELS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    trees = {"this": REPO}
    if args.against:
        trees = {"before": Path(args.against).resolve(), "after": REPO}

    print("| N | tree | plan (CPU) | per site | wall | peak RSS | load | split (CPU s) |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    times: dict[str, dict[int, float]] = {name: {} for name in trees}
    for size in args.sizes:
        results = alternating(
            trees, args.repeat, lambda tree, size=size: in_subprocess(tree, "chain", size, 64)
        )
        for name, result in results.items():
            assert result["sites"] == size, result  # every block is a site, or the figures mean nothing
            times[name][size] = result["plan"]
            print(
                f"| {size} | {name} | {result['plan']:.2f} s | {1000 * result['plan'] / size:.1f} ms "
                f"| {result['wall']:.2f} s | {result['peak_rss_gb']:.2f} GB | {result['load']:.1f} "
                f"| {split(result)} |",
                flush=True,
            )
    for name, by_size in times.items():
        if 250 in by_size and 2000 in by_size:
            print(f"{name}: time(2000) / time(250) = {by_size[2000] / by_size[250]:.2f} (linear: 8)")

    if not args.skip_yolo:
        commands = alternating(trees, args.repeat, cli_time)
        splits = alternating(trees, args.repeat, lambda tree: in_subprocess(tree, "yolov5l"))
        for name in trees:
            command, result = commands[name], splits[name]
            print(
                f"YOLOv5-L ({name}), rewrite plan yolov5l --rules slim-neck: {command['wall']:.2f} s wall, "
                f"{command['cpu']:.2f} s CPU (load {command['load']:.1f}); in one process: plan "
                f"{result['plan']:.2f} s CPU, {result['sites']} sites; {split(result)}",
                flush=True,
            )

    if not args.skip_large:
        for blocks, channels in LARGE:
            results = alternating(
                trees, args.repeat, lambda tree, b=blocks, c=channels: in_subprocess(tree, "chain", b, c)
            )
            for name, result in results.items():
                print(
                    f"{result['params'] / 1e9:.1f} B parameters ({result['sites']} blocks of {channels} channels, "
                    f"{name}) on meta: plan {result['plan']:.1f} s CPU ({result['wall']:.1f} s wall), peak RSS "
                    f"{result['peak_rss_gb']:.2f} GB, load {result['load']:.1f}; {split(result)}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
