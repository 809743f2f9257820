"""Why the matcher is anchored: its chain search next to networkx's subgraph matching, on YOLOv5-L's graph.

Both look for the built-in conv rule's chains — Conv2d → BatchNorm2d? → activation? ("?" = optional), each link
the sole user of the one before, the longest chain from each conv — and must find the same ones. The anchored
search (``rewrite.match``) starts only at nodes the first step accepts and follows sole users;
``networkx``'s ``DiGraphMatcher`` needs one pattern per combination of optional steps (four here), a
``node_match`` callback for the class names, and a filter for the sole-user links afterwards. Measured side by
side in one run (interleaved repetitions, medians).

    python bench/match_speed.py [repetitions]      (default 5)
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time

import networkx as nx
import torch
from networkx.algorithms.isomorphism import DiGraphMatcher

from rewrite.graph import NodeKey, to_networkx
from rewrite.match import _CallIndex, _chain_candidates  # the search itself, without the site facts
from rewrite.rules import load_rules
from rewrite.tracer import Traced, trace
from rewrite.zoo import create_model


def anchored_chains(traced: Traced, rule) -> set[tuple[NodeKey, ...]]:
    calls = _CallIndex(traced)
    return {
        tuple(NodeKey(traced.regions[calls.region_of[node]].path, node.name) for node in candidate.nodes)
        for candidate in _chain_candidates(calls, rule)
    }


def networkx_chains(graph: nx.DiGraph, rule) -> set[tuple[str, ...]]:
    steps = rule.match.chain
    optional = [i for i, step in enumerate(steps) if step.optional]
    longest: dict[str, tuple[str, ...]] = {}
    for dropped in itertools.chain.from_iterable(
        itertools.combinations(optional, r) for r in range(len(optional) + 1)
    ):
        kept = [step for i, step in enumerate(steps) if i not in dropped]
        pattern = nx.DiGraph()
        pattern.add_nodes_from((i, {"step": step}) for i, step in enumerate(kept))
        pattern.add_edges_from((i, i + 1) for i in range(len(kept) - 1))

        def node_match(model_node: dict, pattern_node: dict) -> bool:
            module = model_node["module"]
            name = type(module).__name__ if module is not None else None
            return pattern_node["step"].accepts(model_node["op"], model_node["target"], name)

        for mapping in DiGraphMatcher(graph, pattern, node_match=node_match).subgraph_monomorphisms_iter():
            chain = tuple(sorted(mapping, key=mapping.get))
            is_chain = all(list(graph.successors(a)) == [b] for a, b in itertools.pairwise(chain))
            if is_chain and len(chain) > len(longest.get(chain[0], ())):
                longest[chain[0]] = chain
    return set(longest.values())


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(repetitions: int = 5) -> None:
    with torch.device("meta"):
        model = create_model("yolov5l").eval()
    traced = trace(model, (torch.zeros(1, 3, 640, 640, device="meta"),))
    graph = to_networkx(traced)
    rule = load_rules("gsconv-only").rules[0]

    found = anchored_chains(traced, rule)
    assert found == networkx_chains(graph, rule), "the two searches disagree"

    times: dict[str, list[float]] = {"anchored": [], "networkx DiGraphMatcher": []}
    for _ in range(repetitions):
        times["anchored"].append(seconds(lambda: anchored_chains(traced, rule)))
        times["networkx DiGraphMatcher"].append(seconds(lambda: networkx_chains(graph, rule)))
    base = statistics.median(times["anchored"])
    print(f"YOLOv5-L graph: {graph.number_of_nodes()} nodes; both find the same {len(found)} conv chains")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>26}: {median * 1e3:8.1f} ms   ratio to anchored {median / base:6.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
