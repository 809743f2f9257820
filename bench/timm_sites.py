"""How many sites a generic ``conv → norm → activation?`` rule finds on timm models, as a new user would try it.

Each model is built from timm's code (no weights), traced at 1×3×96×96 and matched with one rule, everywhere:

    match.chain = ["conv", "norm", "activation?"], where groups = 1, dilation = 1, same size, even outputs
    → GSConv, activation inherited

Printed per model: the sites the rule matches, the candidates it rejects, and the classes of the matched norms and
of the activations the sites get (a model whose convs, norms or activations the vocabulary misses shows 0 sites).

    python bench/timm_sites.py [--only NAME ...]

Needs timm (in the ``test`` extra).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings

import timm
import torch
from tabulate import tabulate

import rewrite
from rewrite.match import find_matches

MODELS = (
    "cspdarknet53",
    "darknet53",
    "cs3darknet_s",
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "mnasnet_050",
    "regnety_002",
    "vovnet39a",
    "ese_vovnet19b_dw",
    "repvgg_a0",
    "densenet121",
    "dpn68",
    "mixnet_s",
    "fbnetc_100",
    "rexnet_100",
    "ghostnet_050",
    "hardcorenas_a",
    "tinynet_e",
    "lcnet_050",
    "resnet18",
)

RULES = """
[ruleset]
name = "generic-gsconv"

[[rule]]
name = "conv-norm-act"
match.chain = ["conv", "norm", "activation?"]
where.groups = 1
where.dilation = 1
where.same_size = true
where.out_channels = { multiple_of = 2 }
replace.builder = "GSConv"
replace.activation = "inherit"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=MODELS)
    args = parser.parse_args()
    rule_set = rewrite.parse_rules(RULES)
    rows = []
    for name in args.only:
        start = time.perf_counter()
        model = timm.create_model(name, pretrained=False).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = rewrite.trace(model, torch.zeros(1, 3, 96, 96))
        found = find_matches(
            traced, rule_set, rewrite.resolve_scope(None, traced, rewrite.resolve_stages(model, traced))
        )
        norms = collections.Counter(type(match.site.norm).__name__ for match in found.matches)
        acts = collections.Counter(type(match.site.activation).__name__ for match in found.matches)
        rows.append(
            (
                name,
                len(found.matches),
                len(found.rejected),
                ", ".join(f"{k} {v}" for k, v in norms.most_common()),
                ", ".join(f"{k} {v}" for k, v in acts.most_common()),
            )
        )
        print(f"{name}: {len(found.matches)} sites in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(tabulate(rows, headers=("model", "sites", "rejected", "norms", "activations"), tablefmt="github"))
    print(f"\n{sum(1 for row in rows if row[1] == 0)} of {len(rows)} models with 0 sites")


if __name__ == "__main__":
    main()
