"""Export a model to ONNX: folded first, then checked against PyTorch with ONNX Runtime when it is installed.

:func:`export_onnx` folds the model (:func:`rewrite.fold.fold`: BatchNorms, channel shuffles and identities
gone), exports it with ``torch.onnx.export(dynamo=True)`` — the ``torch.export`` based exporter, the default in
current torch and the one that handles ``GraphModule`` results and nested outputs; the older TorchScript
exporter fails on such graphs in torch 2.14 — and, when ``onnxruntime`` is installed, runs the file on the example
inputs and measures the largest relative difference from the PyTorch model: per output,
``max|onnx - torch| / max|torch|``, the largest over outputs. With ``dynamic_batch`` the batch dimension of every
input is left free, and the check also runs at twice the example batch.

The file is written under a temporary name beside ``path`` and renamed into place once complete.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from rewrite.errors import ExportError, one_line
from rewrite.files import write_atomically
from rewrite.fold import fold

__all__ = ["Exported", "export_onnx"]


@dataclass(frozen=True)
class Exported:
    """Where the ONNX file went, and how far ONNX Runtime's outputs are from PyTorch's."""

    path: Path
    # Batch size -> largest relative difference (see the module docstring); empty without onnxruntime.
    differences: dict[int, float]

    @property
    def max_difference(self) -> float | None:
        return max(self.differences.values()) if self.differences else None


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = False,
    check: bool = True,
) -> Exported:
    """Fold ``model`` and export it to the ONNX file ``path``; ``model`` itself is not touched.

    ``example_inputs`` is what the model's forward takes (a tensor, or a tuple of positional arguments).
    With ``check`` (the default) and ``onnxruntime`` installed, the file runs on the example inputs and the
    result's ``differences`` hold the largest relative difference from the PyTorch model, per batch size.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU()).eval()
    >>> out = export_onnx(model, torch.rand(1, 3, 16, 16), tempfile.mkdtemp() + "/m.onnx", dynamic_batch=True)
    >>> sorted(out.differences), out.max_difference < 1e-5
    ([1, 2], True)
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    target = Path(path)
    reference = copy.deepcopy(model).eval()
    folded = fold(reference, inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        # Mirrors the inputs' structure, tensors nested in containers included.
        dynamic_shapes = pytree.tree_map(
            lambda a: {0: batch} if isinstance(a, torch.Tensor) else None, inputs
        )

    def write(temporary: Path) -> None:
        _export(folded, inputs, temporary, dynamic_shapes)

    try:
        write_atomically({target: write})
    except OSError as error:
        raise ExportError(f"{target}: cannot write there: {error.strerror or error}") from error

    differences: dict[int, float] = {}
    if check and _onnxruntime() is not None:
        checks = [inputs]
        if dynamic_batch:  # a second, different batch size: the flipped inputs follow the originals
            checks.append(pytree.tree_map(_doubled, inputs))
        for args in checks:
            batch_size = next(a.shape[0] for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor))
            differences[batch_size] = _difference(reference, args, target)
    return Exported(target, differences)


def _export(model: nn.Module, inputs: tuple, path: Path, dynamic_shapes: tuple | None) -> None:
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # its notes on constants that are not initializers are noise here
    try:
        # The exporter prints its progress on stdout, which carries only reports in this library.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                # The exporter reads a trailing dict as keyword arguments; an empty one says there are none, so
                # a dict the forward takes (say, of images) stays the positional argument it is.
                (*inputs, {}),
                str(path),
                dynamo=True,
                external_data=False,
                dynamic_shapes=dynamic_shapes,
                input_names=_input_names(inputs),
                verbose=False,
            )
    except OSError:
        raise
    except Exception as error:  # the exporter raises many types; all mean "cannot export"
        raise ExportError(f"{type(model).__name__} cannot be exported to ONNX: {one_line(error)}") from error
    finally:
        exporter_log.setLevel(level)


def _input_names(inputs: tuple) -> list[str]:
    count = sum(isinstance(a, torch.Tensor) for a in pytree.tree_leaves(inputs))
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _difference(model: nn.Module, args: tuple, path: Path) -> float:
    ort = _onnxruntime()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
    feed = {spec.name: t.numpy() for spec, t in zip(session.get_inputs(), tensors, strict=True)}
    got = session.run(None, feed)
    with torch.no_grad():
        expected = [t for t in pytree.tree_leaves(model(*args)) if isinstance(t, torch.Tensor)]
    if len(got) != len(expected):
        raise ExportError(f"{path}: ONNX Runtime gives {len(got)} outputs, the model {len(expected)}")
    worst = 0.0
    for onnx_out, torch_out in zip(got, expected, strict=True):
        torch_out = torch_out.double()
        scale = torch_out.abs().max().item() if torch_out.numel() else 0.0
        error = (
            (torch.from_numpy(onnx_out).double() - torch_out).abs().max().item() if torch_out.numel() else 0.0
        )
        worst = max(worst, error / scale if scale else error)
    return worst


def _doubled(value: Any) -> Any:
    return torch.cat((value, value.flip(0).flip(-1))) if isinstance(value, torch.Tensor) else value


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime
