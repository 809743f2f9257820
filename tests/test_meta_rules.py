"""rewrite.meta_rules: each rule gives the layout torch's meta kernel gives, or leaves the call to the kernel; a
meta run of a detector then never imports torch._dynamo."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import torch

from rewrite.meta_ops import meta_op_signature, meta_output
from rewrite.meta_rules import RULED, Layout, output_by_rule

aten = torch.ops.aten
BATCH_NORMS = [
    aten.native_batch_norm.default,
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit.no_stats,
    aten._native_batch_norm_legit_no_training.default,
]


def layouts(output: torch.Tensor | tuple[torch.Tensor, ...]) -> list[tuple]:
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return [(tuple(t.shape), t.stride(), t.dtype) for t in outputs]


def by_rule(func: object, args: tuple, kwargs: dict | None = None) -> list[tuple] | None:
    made = output_by_rule(func, args, kwargs or {})
    if made is None:
        return None
    return [(m.shape, m.stride, m.dtype) for m in (made if isinstance(made, tuple) else (made,))]


def assert_rule_matches_kernel(func: object, args: tuple, kwargs: dict | None = None) -> bool:
    """The rule's layout is the kernel's; where the kernel raises, the rule gives none. Whether the rule covered
    the call."""
    kwargs = kwargs or {}
    ruled = by_rule(func, args, kwargs)
    try:
        expected = layouts(func(*args, **kwargs))
    except Exception:  # noqa: BLE001 -- the kernel's own error: the rule must leave such calls to it
        assert ruled is None, (func, described(args))
        return False
    assert ruled is None or ruled == expected, (func, described(args), ruled, expected)
    return ruled is not None


def described(args: tuple) -> list:
    def one(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), value.stride(), value.dtype)
        if isinstance(value, (list, tuple)):
            return [one(item) for item in value]
        return value

    return [one(arg) for arg in args]


def batch_norm_calls() -> Iterator[tuple]:
    """(op, args) of every BatchNorm op the rule may meet: shapes with ambiguous layouts (one channel, 1x1
    maps), each floating dtype, both modes, with and without weights and running statistics, both orders."""
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
        yield aten.native_batch_norm.default, (x, weight, bias, mean, var, training, 0.1, 1e-5)
        if statistics:
            yield aten._native_batch_norm_legit.default, (x, weight, bias, mean, var, training, 0.1, 1e-5)
            yield aten._native_batch_norm_legit_no_training.default, (x, weight, bias, mean, var, 0.1, 1e-5)
        else:
            yield aten._native_batch_norm_legit.no_stats, (x, weight, bias, training, 0.1, 1e-5)


def test_the_batch_norm_rule_gives_what_the_meta_kernel_gives() -> None:
    covered = sum(assert_rule_matches_kernel(func, args) for func, args in batch_norm_calls())
    assert covered > 400  # the rule covers the plain cases, not a handful


@pytest.mark.parametrize(
    "shape, stride",
    [((2, 8, 1, 1), (8, 1, 99, 7)), ((2, 8, 5, 5), (400, 50, 10, 1)), ((1, 8, 5, 5), (999, 25, 5, 1))],
)
def test_the_batch_norm_rule_leaves_other_layouts_to_the_kernel(shape: tuple, stride: tuple) -> None:
    """Strides the kernel recomputes (a slice, odd strides of size-one dimensions) are not the rule's."""
    x = torch.empty_strided(shape, stride, device="meta")
    args = (x, None, None, torch.empty(8, device="meta"), torch.empty(8, device="meta"), False, 0.1, 1e-5)
    assert output_by_rule(aten.native_batch_norm.default, args, {}) is None


SHAPES = [
    (),
    (5,),
    (1,),
    (3, 4),
    (1, 4),
    (2, 3, 4),
    (2, 1, 4, 1),
    (2, 3, 4, 5),
    (1, 3, 1, 5),
    (1, 3, 20, 20, 2),
]


def some_tensor(
    rng: random.Random, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A meta tensor of ``shape`` in one of the layouts a forward makes: standard, channels-last, permuted, a
    slice of a larger one, or expanded from size-one dimensions."""
    kind = rng.choice(["standard", "channels-last", "permuted", "slice", "expanded"])
    if kind == "channels-last" and len(shape) == 4:
        return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=torch.channels_last)
    if kind == "permuted" and shape:
        order = list(range(len(shape)))
        rng.shuffle(order)
        base = torch.empty([shape[dim] for dim in order], dtype=dtype, device="meta")
        return base.permute(*[order.index(dim) for dim in range(len(shape))])
    if kind == "slice" and shape:
        base = torch.empty([2 * size for size in shape], dtype=dtype, device="meta")
        return base[tuple(slice(0, size) for size in shape)]
    if kind == "expanded":
        small = [1 if rng.random() < 0.5 else size for size in shape]
        return torch.empty(small, dtype=dtype, device="meta").expand(shape)
    return torch.empty(shape, dtype=dtype, device="meta")


def elementwise_calls(rng: random.Random) -> Iterator[tuple]:
    for _ in range(1500):
        shape = rng.choice(SHAPES)
        dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.float16])
        a = some_tensor(rng, shape, dtype)
        op = rng.choice(["add", "sub", "mul", "div", "pow"])
        if op == "pow":
            yield aten.pow.Tensor_Scalar, (a, rng.choice([2, 0.5, 1, 3, 2.0, -1]))
            continue
        if rng.random() < 0.3:
            other = rng.choice([2, 0.5, 1.0, 0, True])
        else:  # broadcast: some dimensions of size one, or fewer of them
            other_shape = [1 if rng.random() < 0.3 else size for size in shape]
            other_shape = (
                other_shape[rng.randint(0, len(other_shape)) :] if rng.random() < 0.3 else other_shape
            )
            other = some_tensor(rng, tuple(other_shape), rng.choice([dtype, dtype, torch.float64]))
        yield getattr(aten, op).Tensor, (a, other)


def test_the_elementwise_rule_gives_what_the_meta_kernel_gives() -> None:
    rng = random.Random(0)
    covered = sum(assert_rule_matches_kernel(func, args) for func, args in elementwise_calls(rng))
    assert covered > 500


def test_the_elementwise_rule_leaves_alpha_and_mismatched_shapes_to_the_kernel() -> None:
    x, y = torch.empty(2, 3, device="meta"), torch.empty(4, 3, device="meta")
    assert output_by_rule(aten.add.Tensor, (x, x), {"alpha": 2}) is None
    assert output_by_rule(aten.add.Tensor, (x, y), {}) is None  # the kernel's own error, not the rule's


def joining_calls(rng: random.Random) -> Iterator[tuple]:
    for _ in range(800):
        shape = rng.choice([shape for shape in SHAPES if shape])
        dtype = rng.choice([torch.float32, torch.float16])
        if rng.random() < 0.5:
            dim = rng.randrange(-len(shape), len(shape))
            tensors = []
            for _ in range(rng.randint(1, 3)):
                sizes = list(shape)
                sizes[dim] = rng.randint(1, 4)
                tensors.append(some_tensor(rng, tuple(sizes), dtype))
            yield aten.cat.default, (tensors, dim)
        else:
            dim = rng.randrange(-len(shape) - 1, len(shape) + 1)
            tensors = [some_tensor(rng, shape, dtype) for _ in range(rng.randint(1, 3))]
            yield aten.stack.default, (tensors, dim)


def test_the_cat_and_stack_rules_give_what_the_meta_kernels_give() -> None:
    rng = random.Random(0)
    covered = sum(assert_rule_matches_kernel(func, args) for func, args in joining_calls(rng))
    assert covered > 500


def test_the_cat_rule_leaves_mixed_ranks_and_dtypes_to_the_kernel() -> None:
    x = torch.empty(2, 3, device="meta")
    assert output_by_rule(aten.cat.default, ([x, torch.empty(0, device="meta")], 0), {}) is None
    assert output_by_rule(aten.cat.default, ([x, x.double()], 0), {}) is None


@pytest.mark.parametrize("end", [0, 1, 20, 2.5, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_the_arange_rule_gives_what_the_meta_kernel_gives(end: float, dtype: torch.dtype) -> None:
    kwargs = {"dtype": dtype, "device": torch.device("meta"), "pin_memory": False}
    assert assert_rule_matches_kernel(aten.arange.default, (end,), kwargs)


def test_the_memo_makes_what_a_rule_gives() -> None:
    x = torch.empty(2, 8, 4, 4, device="meta")
    signature = meta_op_signature(aten.add.Tensor, (x, x), {})
    made = meta_output(signature, (x, x), {}).make()
    assert layouts(made) == layouts(x + x) and made.is_meta
    assert all(op in RULED for op in BATCH_NORMS)
    assert isinstance(output_by_rule(aten.add.Tensor, (x, x), {}), Layout)


def test_no_rule_has_a_decomposition_that_could_count_flops() -> None:
    """The profiler charges a ruled op no FLOPs without running it: right only while FlopCounterMode would
    count none, that is, while no ruled op decomposes into others (BatchNorm's into ruled ones)."""
    composite = torch._C.DispatchKey.CompositeImplicitAutograd
    for op in RULED - {aten.native_batch_norm.default}:
        assert composite not in op.py_kernels
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), composite)


def test_a_plan_of_a_detector_on_meta_does_not_import_dynamo() -> None:
    """The meta kernels of BatchNorm, arithmetic, cat, stack and arange import torch._dynamo (seconds)."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        import rewrite
        from rewrite.zoo import create_model

        for mode in ("eval", "train"):
            model = getattr(create_model("yolov5n"), mode)()
            rewrite.plan(model, "slim-neck", torch.zeros(1, 3, 128, 128))
        print("torch._dynamo" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
