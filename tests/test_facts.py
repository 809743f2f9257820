"""rewrite.facts: the typed record the tracer writes on every node, and fx's tensor_meta read flattened."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from rewrite.errors import TraceError
from rewrite.facts import TENSOR_META_KEY, CallId, dtypes, facts, record_tensor_meta, shapes
from rewrite.tracer import trace


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.conv(x).chunk(2, dim=1)


def test_a_node_the_tracer_never_made_is_a_one_line_trace_error():
    node = fx.symbolic_trace(nn.ReLU()).graph.find_nodes(op="placeholder")[0]
    with pytest.raises(TraceError, match="carries no rewrite facts: only graphs that rewrite.trace"):
        facts(node)


def test_facts_name_the_module_call_and_its_enclosing_calls():
    traced = trace(nn.Sequential(Split()), torch.randn(1, 3, 4, 4))
    conv = next(node for node in traced.regions[0].graph_module.graph.nodes if node.op == "call_module")
    node_facts = facts(conv)
    assert (node_facts.path, node_facts.type_name, node_facts.call) == (
        "0.conv",
        "Conv2d",
        CallId("0.conv", 0),
    )
    assert node_facts.calls == (CallId("", 0), CallId("0", 0), CallId("0.conv", 0))


def test_shapes_and_dtypes_flatten_a_tuple_output_in_pytree_order():
    traced = trace(Split(), torch.randn(1, 3, 4, 4))
    chunk = next(node for node in traced.regions[0].graph_module.graph.nodes if node.target == "chunk")
    assert shapes(chunk) == ((1, 2, 4, 4), (1, 2, 4, 4))
    assert dtypes(chunk) == (torch.float32, torch.float32)


def test_a_value_without_tensors_records_nothing():
    node = fx.Graph().placeholder("size")
    record_tensor_meta(node, (2, 3))
    assert TENSOR_META_KEY not in node.meta and shapes(node) == () and dtypes(node) == ()
