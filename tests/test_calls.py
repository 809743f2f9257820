"""CallIndex: a traced model's module calls, which nodes each made and which module object made it."""

from __future__ import annotations

import torch
from models import SharedBlock
from torch import nn

from rewrite.calls import CallIndex, module_at
from rewrite.facts import CallId, facts
from rewrite.tracer import trace


def index_of(model: nn.Module) -> CallIndex:
    return CallIndex(trace(model, torch.randn(1, 8, 8, 8)))


def call_nodes(index: CallIndex, target: str) -> list:
    return [node for node in index.ordered if node.op == "call_module" and node.target == target]


def test_each_call_of_a_shared_module_is_its_own_call_of_one_object():
    index = index_of(SharedBlock())
    first, second = call_nodes(index, "conv")
    assert (facts(first).call, facts(second).call) == (CallId("conv", 0), CallId("conv", 1))
    assert index.object_of_call[CallId("conv", 0)] == index.object_of_call[CallId("conv", 1)]
    assert index.calls_of_object[index.object_of_call[CallId("conv", 0)]] == {
        CallId("conv", 0),
        CallId("conv", 1),
    }


def test_calls_within_are_the_calls_made_only_of_the_given_nodes():
    index = index_of(SharedBlock())
    first, _ = call_nodes(index, "conv")
    act, _ = call_nodes(index, "act")
    assert index.calls_within([first]) == {CallId("conv", 0)}
    assert index.calls_within([first, act]) == {CallId("conv", 0), CallId("act", 0)}


def test_identity_holds_the_stateful_modules_called_and_the_one_swapped():
    index = index_of(SharedBlock())
    first, _ = call_nodes(index, "conv")
    act, _ = call_nodes(index, "act")
    conv_object = index.object_of_call[CallId("conv", 0)]
    act_object = index.object_of_call[CallId("act", 0)]
    assert index.identity([first, act], swapped=None) == {conv_object}  # the ReLU holds no state
    assert index.identity([act], swapped=CallId("act", 0)) == {act_object}


def test_a_module_made_in_a_forward_stands_for_itself():
    model = SharedBlock()
    assert module_at(model, "conv") is model.conv
    assert type(module_at(model, "not.there")) is nn.Module


def test_nothing_is_hidden_when_every_call_is_in_a_graph():
    index = index_of(SharedBlock())
    assert index.hidden_calls(call_nodes(index, "conv")) is None


class OpaqueTwice(nn.Module):
    """A forward fx cannot trace (it branches on a value) that calls its conv twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.conv(y) if y.sum() > 0 else self.conv(-y)


def test_a_module_an_opaque_forward_calls_twice_is_hidden_in_part():
    index = index_of(OpaqueTwice())
    reason = index.hidden_calls(call_nodes(index, "conv"))
    assert reason is not None and reason.startswith("conv is called 2 times by a module fx cannot trace")
