"""find_matches(): what a match holds (the traced graphs' fx nodes), its kind for each shape of site, and the
reasons it gives for a candidate it rejects; on small models written here."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from rule_sets import chain_rule_toml
from torch import fx, nn

import rewrite
from rewrite.facts import facts
from rewrite.match import Kind, Match, MatchResult, Rejection, find_matches
from rewrite.tracer import Traced

CHAIN = chain_rule_toml(rule="conv-chain")

BLOCK = """
[ruleset]
name = "block"
[[rule]]
name = "block"
match.module = ["Block"]
replace.builder = "GSConv"
"""


class Block(nn.Module):
    """Conv → BatchNorm → SiLU in a module of its own."""

    def __init__(self, c_in: int = 4, c_out: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class WithBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x)) * 2


class Inline(nn.Module):
    """The same chain written in the root's forward, followed by an op of the root's own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x))) + 1


class FunctionalActivation(nn.Module):
    """A conv and a norm as modules, the activation a function: only a graph rewrite can replace all three."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))) + 1


class PairBlock(Block):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.act(self.bn(self.conv(x + y)))


class PairNet(nn.Module):
    """A block whose forward takes two tensors: a site with two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.block = PairBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, x * 2)


def find(model: nn.Module, rules: str, x: torch.Tensor) -> tuple[Traced, MatchResult]:
    traced = rewrite.trace(model, x)
    scope = rewrite.resolve_scope(None, traced, rewrite.resolve_stages(model, traced))
    return traced, find_matches(traced, rewrite.parse_rules(rules), scope)


def region_nodes(traced: Traced, match: Match) -> list[fx.Node]:
    return list(traced.regions[match.region].graph_module.graph.nodes)


def test_a_module_site_holds_the_traced_nodes_of_its_call() -> None:
    traced, result = find(WithBlock().eval(), BLOCK, torch.randn(1, 3, 8, 8))
    (match,) = result.matches
    assert (match.path, match.kind, match.calls) == ("block", Kind.MODULE, 1)
    graph_nodes = region_nodes(traced, match)
    assert all(isinstance(node, fx.Node) and node in graph_nodes for node in match.nodes)
    assert [node.target for node in match.nodes] == ["block.conv", "block.bn", "block.act"]
    assert match.input_node.target == "stem" and match.output_node is match.nodes[-1]
    assert all(facts(node).frames[1].path == "block" for node in match.nodes)
    assert (match.site.module_type, match.site.in_channels, match.site.out_channels) == ("Block", 4, 8)


def test_an_inline_chain_of_modules_is_a_modules_site_named_after_its_first_module() -> None:
    _, result = find(Inline().eval(), CHAIN, torch.randn(1, 3, 8, 8))
    (match,) = result.matches
    assert (match.path, match.kind) == ("conv", Kind.MODULES)
    assert [node.target for node in match.nodes] == ["conv", "bn", "act"]
    assert match.input_node.op == "placeholder" and match.output_node.target == "act"
    assert [node.name for node in match.output_node.users] == ["add"]


def test_a_chain_with_a_functional_op_is_a_graph_site() -> None:
    _, result = find(FunctionalActivation().eval(), CHAIN, torch.randn(1, 3, 8, 8))
    (match,) = result.matches
    assert (match.path, match.kind) == ("conv", Kind.GRAPH)
    assert [node.target for node in match.nodes] == ["conv", "bn", F.relu]
    assert type(match.site.activation) is nn.ReLU
    assert match.occurrences[0].nodes == match.nodes  # the same fx nodes, not names to look up


def test_one_module_called_twice_alike_is_one_match_serving_both_calls() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Block(4, 4))
    shared = model[1]
    model.append(shared)  # the same Block object, called twice in a row
    _, result = find(model.eval(), BLOCK, torch.randn(1, 3, 8, 8))
    (match,) = result.matches
    assert (match.kind, match.calls, match.untied) == (Kind.MODULE, 2, "")
    assert len(match.nodes) == 6 and len({facts(node).call for node in match.nodes}) == 6


def test_rejections_say_why() -> None:
    strict = chain_rule_toml(rule="conv-chain", where={"out_channels": {"multiple_of": 3}})
    _, result = find(Inline().eval(), strict, torch.randn(1, 3, 8, 8))
    assert result.matches == [] and result.unmatched_rules == []
    assert result.rejected == [Rejection("conv", "conv-chain", "out_channels 8 is not a multiple of 3")]

    _, result = find(PairNet().eval(), BLOCK.replace('["Block"]', '["PairBlock"]'), torch.randn(1, 4, 8, 8))
    assert result.rejected == [
        Rejection("block", "block", "the site has 2 inputs and 1 outputs; builders take one of each")
    ]

    linear = BLOCK.replace('["Block"]', '["Linear"]')
    _, result = find(nn.Sequential(nn.Linear(4, 8)), linear, torch.randn(4))
    assert result.rejected == [
        Rejection("0", "block", "the site's input and output are not single (N, C, ...) tensors")
    ]


def test_a_rule_that_catches_nothing_is_unmatched() -> None:
    _, result = find(nn.Sequential(nn.Linear(4, 4)), CHAIN, torch.randn(2, 4))
    assert (result.matches, result.rejected, result.unmatched_rules) == ([], [], ["conv-chain"])


def test_a_kind_is_its_word_where_it_is_shown() -> None:
    assert [kind.value for kind in Kind] == ["module", "modules", "graph"]
    assert Kind.MODULES == "modules" and f"{Kind.GRAPH}" == "graph"
    assert json.dumps({"kind": Kind.MODULE}) == '{"kind": "module"}'
    plan = rewrite.plan(Inline().eval(), rewrite.parse_rules(CHAIN), torch.randn(1, 3, 8, 8))
    assert [site.kind for site in plan.sites] == [Kind.MODULES]
    assert json.loads(rewrite.render(plan, "json"))["sites"][0]["kind"] == "modules"
