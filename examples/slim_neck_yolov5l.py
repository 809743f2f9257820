"""Slim-neck YOLOv5-L, end to end: profile, plan, compare rule sets, apply, check the result runs, report.

The same walk-through as ``yolov5l_slim_neck.ipynb``, without the charts::

    python examples/slim_neck_yolov5l.py                      # writes slim-neck-yolov5l.html here
    python examples/slim_neck_yolov5l.py --html /tmp/report.html

No weights are downloaded: YOLOv5-L is built from code (``rewrite.zoo``), freshly initialised.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tabulate import tabulate

import rewrite
from rewrite.gates import check_gates
from rewrite.report import render_profile
from rewrite.zoo import create_model

MODEL = "yolov5l"
INPUT = (1, 3, 640, 640)  # what the figures are quoted for: batch 1, 640x640, nc=80, eval mode
RULE_SETS = ("gsconv-only", "slim-neck")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--html", type=Path, default=Path("slim-neck-yolov5l.html"), help="where to write the HTML report"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # 1. Profile. On the meta device the model has shapes but no weights: counting costs almost nothing.
    with torch.device("meta"):
        meta_model = create_model(MODEL).eval()
    meta_input = torch.zeros(INPUT, device="meta")
    profile = rewrite.profile(meta_model, meta_input)
    print(render_profile(profile, model_name=MODEL, input_shapes=[INPUT]))

    # 2. Plan both rule sets (dry runs, also on meta) and print the slim-neck report.
    plans = {rules: rewrite.plan(meta_model, rules, meta_input, model_name=MODEL) for rules in RULE_SETS}
    slim_plan = plans["slim-neck"]
    gates = check_gates(slim_plan, min_flops_reduction=10.0)
    print(rewrite.render(slim_plan, "text", gates=gates))

    # 3. Base vs GSConv-only vs slim-neck, in one table.
    print("Base vs GSConv-only vs slim-neck")
    print("--------------------------------")
    print(comparison_table(profile, plans))
    print()

    # 4. Apply: that needs real weights, so build the model for real and plan it again. The figures are the same
    #    (planning always measures on a weight-free copy); apply() returns a rewritten copy.
    model = create_model(MODEL).eval()
    snapshot = {name: t.clone() for name, t in model.state_dict().items()}
    plan = rewrite.plan(model, "slim-neck", torch.zeros(INPUT), model_name=MODEL)
    expect(plan.sites == slim_plan.sites, "the plan of the real model differs from the plan made on meta")
    slim = plan.apply()
    neck = [type(block).__name__ for block in slim.model[10:24]]
    print(f"rewritten neck (model.10 … model.23): {', '.join(neck)}")
    carried = [
        torch.equal(slim.get_parameter(name), model.get_parameter(name))
        for name in ("model.0.conv.weight", "model.9.cv2.conv.weight", "model.24.m.0.weight")
    ]
    expect(all(carried), "backbone and head weights were not carried over")
    print(
        "backbone and head weights: carried over from the original; the new neck blocks are freshly initialised"
    )

    # 5. Inference: same output shapes as the original.
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        base_out, slim_out = model(images)[0], slim.eval()(images)[0]
    expect(
        slim_out.shape == base_out.shape, f"eval output {tuple(slim_out.shape)}, was {tuple(base_out.shape)}"
    )
    print(f"eval on 1×3×64×64: output {tuple(slim_out.shape)} (original: {tuple(base_out.shape)})")

    # 6. One training step on a tiny batch: every parameter, old or new, gets a gradient.
    slim.train()
    optimizer = torch.optim.SGD(slim.parameters(), lr=0.01, momentum=0.9)
    raw = slim(torch.rand(2, 3, 64, 64))  # train mode: the three raw maps, (B, anchors, ny, nx, 85)
    loss = sum(level.pow(2).mean() for level in raw)  # a stand-in for the YOLO loss
    loss.backward()
    no_grad = [name for name, p in slim.named_parameters() if p.grad is None]
    expect(
        not no_grad and torch.isfinite(loss), f"train step: loss {loss.item()}, no gradient for {no_grad[:3]}"
    )
    optimizer.step()
    shapes = ", ".join(str(tuple(level.shape)) for level in raw)
    count = sum(1 for _ in slim.parameters())
    print(
        f"train step on 2×3×64×64: outputs {shapes}; loss {loss.item():.4f}; "
        f"all {count} parameter tensors got a gradient"
    )

    # 7. The user's model was neither rewritten nor trained along.
    unchanged = all(torch.equal(t, snapshot[name]) for name, t in model.state_dict().items())
    types = (type(model.model[10]).__name__, type(model.model[13]).__name__)
    expect(
        unchanged and types == ("Conv", "C3"),
        f"the original model changed: {types}, weights same: {unchanged}",
    )
    print(f"original model untouched: model.10 is still {types[0]}, model.13 still {types[1]}, same weights")

    # 8. The HTML report: one self-contained file with the tables and SVG charts.
    args.html.write_text(rewrite.render(slim_plan, "html", gates=gates), encoding="utf-8")
    print(f"HTML report written to {args.html}")


def comparison_table(profile: rewrite.Profile, plans: dict[str, rewrite.Plan]) -> str:
    """One row per variant: params and FLOPs, and the change against the base model."""
    rows = [["base", 0, f"{profile.total.params:,}", "", f"{profile.total.flops:,}", ""]]
    for rules, plan in plans.items():
        rows.append(
            [
                rules,
                len(plan.sites),
                f"{plan.params.after:,}",
                f"{plan.params.percent:+.2f}%",
                f"{plan.flops.after:,}",
                f"{plan.flops.percent:+.2f}%",
            ]
        )
    headers = [MODEL, "sites", "params", "Δ params", "FLOPs", "Δ FLOPs"]
    return tabulate(rows, headers, disable_numparse=True, colalign=("left", *["right"] * 5))


def expect(condition: object, message: str) -> None:
    if not condition:
        raise SystemExit(f"slim_neck_yolov5l: {message}")


if __name__ == "__main__":
    main()
