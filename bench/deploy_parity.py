"""How exact folding and ONNX export are on the zoo: relative differences for YOLOv5 base and slim-neck models.

For each model (base and slim-neck), BatchNorm statistics and affine weights are drawn at random (fresh ones fold
to almost nothing), then it prints

* fold: ``max|fold(model)(x) - model(x)| / max|model(x)|`` per output, the largest over outputs (fp32, eval);
* onnx: the same between ONNX Runtime on ``rewrite.export_onnx``'s file (``--dynamic-batch``) and PyTorch, at
  batch 1 and at batch 2.

    python bench/deploy_parity.py [--models yolov5n,yolov5s,yolov5l] [--size 640] [--no-onnx]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import rewrite
from rewrite.zoo import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolov5n,yolov5s,yolov5l")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size)
    print("| model | fold rel. diff | ONNX batch 1 | ONNX batch 2 |")
    print("|---|---:|---:|---:|")
    for name in args.models.split(","):
        base = _with_statistics(create_model(name))
        slim = _with_statistics(rewrite.apply(base, "slim-neck", x))
        for label, model in ((name, base), (f"{name} slim-neck", slim)):
            with torch.no_grad():
                fold_error = _relative(rewrite.fold(model, x)(x), model(x))
            cells = ["", ""]
            if not args.no_onnx:
                with tempfile.TemporaryDirectory(prefix="deploy-parity-") as directory:
                    exported = rewrite.export_onnx(
                        model, x, Path(directory) / "model.onnx", dynamic_batch=True
                    )
                cells = [f"{exported.differences[b]:.1e}" for b in (1, 2)]
            print(f"| {label} | {fold_error:.1e} | {cells[0]} | {cells[1]} |", flush=True)


def _with_statistics(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


def _relative(got: object, expected: object) -> float:
    pairs = zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected), strict=True)
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)


if __name__ == "__main__":
    main()
