"""rewrite.meta_ops: BatchNorm's meta outputs by rule, equal to what its meta kernel gives, and no torch._dynamo."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch

from rewrite.meta_ops import BATCH_NORMS, meta_op_signature, meta_output

aten = torch.ops.aten


def batch_norm_calls() -> list[tuple]:
    """(op, args) of every BatchNorm op the rule may meet: shapes with ambiguous layouts (one channel, 1x1
    maps), each floating dtype, both modes, with and without weights and running statistics, both orders."""
    calls = []
    shapes = [(3, 8), (2, 8, 5), (2, 8, 5, 5), (2, 1, 5, 5), (2, 8, 1, 1), (1, 8, 1, 1), (2, 3, 4, 5, 6)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    for shape, dtype, training, affine, statistics, channels_last in itertools.product(
        shapes, dtypes, [True, False], [True, False], [True, False], [False, True]
    ):
        if channels_last and len(shape) != 4:
            continue
        x = torch.empty(shape, dtype=dtype, device="meta")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        channels = shape[1]
        weight, bias = (torch.empty(channels, device="meta") for _ in range(2)) if affine else (None, None)
        mean, var = (torch.empty(channels, device="meta") for _ in range(2)) if statistics else (None, None)
        calls.append((aten.native_batch_norm.default, (x, weight, bias, mean, var, training, 0.1, 1e-5)))
        if statistics:
            calls.append(
                (aten._native_batch_norm_legit.default, (x, weight, bias, mean, var, training, 0.1, 1e-5))
            )
            calls.append(
                (aten._native_batch_norm_legit_no_training.default, (x, weight, bias, mean, var, 0.1, 1e-5))
            )
        else:
            calls.append((aten._native_batch_norm_legit.no_stats, (x, weight, bias, training, 0.1, 1e-5)))
    return calls


def layouts(outputs: tuple[torch.Tensor, ...]) -> list[tuple]:
    return [(tuple(t.shape), t.stride(), t.dtype, t.device) for t in outputs]


def test_the_batch_norm_rule_gives_what_the_meta_kernel_gives() -> None:
    """Where the rule gives an output, it has the kernel's layout; where the kernel raises, the rule gives none."""
    derived = 0
    for func, args in batch_norm_calls():
        assert func in BATCH_NORMS
        made = meta_output(meta_op_signature(func, args, {}), args, {})
        try:
            expected = layouts(func(*args))
        except Exception:  # noqa: BLE001 -- eval mode without statistics, one value per channel in training
            assert made is None, (func, [getattr(a, "shape", a) for a in args])
            continue
        if made is not None:
            derived += 1
            assert layouts(made.make()) == expected, (func, [getattr(a, "shape", a) for a in args])
    assert derived > 400  # the rule covers the plain cases, not a handful


@pytest.mark.parametrize(
    "shape, stride",
    [((2, 8, 1, 1), (8, 1, 99, 7)), ((2, 8, 5, 5), (400, 50, 10, 1)), ((1, 8, 5, 5), (999, 25, 5, 1))],
)
def test_the_batch_norm_rule_leaves_other_layouts_to_the_kernel(shape: tuple, stride: tuple) -> None:
    """Strides the kernel recomputes (a slice, odd strides of size-one dimensions) are not the rule's."""
    x = torch.empty_strided(shape, stride, device="meta")
    args = (x, None, None, torch.empty(8, device="meta"), torch.empty(8, device="meta"), False, 0.1, 1e-5)
    signature = meta_op_signature(aten.native_batch_norm.default, args, {})
    assert meta_output(signature, args, {}) is None


def test_a_meta_run_and_a_profile_of_batch_norms_do_not_import_dynamo() -> None:
    """BatchNorm's meta kernel is a Python decomposition that imports torch._dynamo (seconds) on first use."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        from torch import nn
        from rewrite.execution import run
        from rewrite.profiler import profile

        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU())
        x = torch.randn(2, 3, 16, 16)
        run(model.train(), (x,))
        profile(model, (x,))
        profile(model.eval(), (x,))
        print("torch._dynamo" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
