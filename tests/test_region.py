"""One region made and run on its own: the region tracer, one-node regions, the recording run."""

from __future__ import annotations

import inspect
from collections import Counter

import torch
from torch import nn

from rewrite.facts import CallId, Frame, facts, shapes
from rewrite.region import ModuleCall, RegionRun, RegionTracer, fx_concrete_args, one_node_region


class Scaled(nn.Module):
    def forward(self, x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return x * scale


class TwiceAct(nn.Module):
    """Calls one shared activation twice, with a conv in between."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(self.act(x)))


def call_of(path: str, module: nn.Module, *args: object) -> ModuleCall:
    stack = (Frame(CallId("", 0), "Net"), Frame(CallId(path, 0), type(module).__name__))
    return ModuleCall(path, module, args, {}, stack)


def bound(call: ModuleCall) -> inspect.BoundArguments:
    arguments = inspect.signature(call.module.forward).bind(*call.args, **call.kwargs)
    arguments.apply_defaults()
    return arguments


def test_a_one_node_region_calls_its_module_once_and_keeps_its_defaults() -> None:
    call = call_of("body.scaled", Scaled(), torch.ones(2))
    region = one_node_region(call, bound(call))
    graph_nodes = list(region.graph_module.graph.nodes)
    assert [(node.op, node.target) for node in graph_nodes] == [
        ("placeholder", "x"),
        ("placeholder", "scale"),
        ("call_module", "scaled"),
        ("output", "output"),
    ]
    assert all(facts(node).path == "body.scaled" for node in graph_nodes)
    assert region.path == "body.scaled" and region.graph_module.scaled is call.module
    torch.testing.assert_close(region.graph_module(torch.ones(2)), torch.full((2,), 2.0))


def test_the_region_tracer_asks_is_leaf_and_numbers_calls_on_from_the_counts_given() -> None:
    model = TwiceAct()
    call = call_of("block", model, torch.randn(1, 3, 4, 4))
    asked = []

    def is_leaf(module: nn.Module, path: str) -> bool:
        asked.append(path)
        return True

    counts = Counter({"block.act": 3})
    tracer = RegionTracer(call, is_leaf=is_leaf, calls=counts)
    graph_module = tracer.graph_module(fx_concrete_args(bound(call)), model=model)
    modules = [facts(node).call for node in graph_module.graph.nodes if node.op == "call_module"]
    assert modules == [CallId("block.act", 3), CallId("block.conv", 0), CallId("block.act", 4)]
    assert set(asked) == {"block.act", "block.conv"}
    assert tracer.calls == Counter({"block.act": 5, "block.conv": 1})
    assert counts == Counter({"block.act": 3})  # the caller's counts change only if it takes the tracer's


def test_the_recording_run_writes_shapes_and_keeps_the_first_call_of_a_leaf_to_open() -> None:
    model = TwiceAct()
    x = torch.randn(1, 3, 4, 4)
    call = call_of("block", model, x)
    tracer = RegionTracer(call, is_leaf=lambda module, path: True, calls={})
    graph_module = tracer.graph_module(fx_concrete_args(bound(call)), model=model)
    run = RegionRun(graph_module, record_shapes=True, keep_calls_of={"block.act"})
    torch.testing.assert_close(run(x), model(x))
    kept = run.kept_calls["block.act"]
    assert kept.module is model.act and kept.kwargs == {}
    torch.testing.assert_close(kept.args[0], x)  # the first call's input, not the second's
    assert kept.stack[-1] == Frame(CallId("block.act", 0), "ReLU")
    assert all(shapes(node) == ((1, 3, 4, 4),) for node in graph_module.graph.nodes)
