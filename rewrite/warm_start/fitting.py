"""Training new blocks: each on its own to its site's recorded inputs and outputs, after copying what it can
from the modules it replaced; the optimizer loop that every phase runs; bfloat16 autocast where it is native."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from rewrite.warm_start.hooks import modes_kept
from rewrite.warm_start.measure import CHECKED, block_error, record, squared_relative
from rewrite.warm_start.sites import BlockSite


def fit_sites(
    rewritten: nn.Module,
    sites: list[BlockSite],
    inputs: list[tuple],
    calls: dict[str, list[tuple[tuple, Any]]],
    fit: Callable[[str, list[tuple[tuple, Any]], float], int],
    seconds: float,
    say: Callable[[str], None],
) -> dict[str, int]:
    """The site-by-site phase, within ``seconds``: each block's first half on the original's inputs at its
    site, then the second half on those and the inputs the rewritten model gives it there. Each half gets an
    equal share of the time still left, so that what the checks between them take comes out of the later
    ones. Returns the steps taken per site."""
    deadline = time.perf_counter() + seconds
    halves = 2 * len(sites)

    def share() -> float:
        nonlocal halves
        halves -= 1
        return max(deadline - time.perf_counter(), 0.0) / (halves + 1)

    steps = {}
    for number, site in enumerate(sites, 1):
        say(f"{site.path} ({number}/{len(sites)}): fitting on the original's inputs")
        steps[site.path] = fit(site.path, calls[site.path], share())
    with modes_kept(rewritten), torch.no_grad():
        rewritten.eval()
        own, _ = record(rewritten, sites, inputs, in_original=False)
    for number, site in enumerate(sites, 1):
        if len(own[site.path]) != len(calls[site.path]):  # its calls do not pair up: it keeps its first half
            continue
        say(f"{site.path} ({number}/{len(sites)}): fitting on its own inputs as well")
        # Both inputs, each with the original's output: fitted to its own inputs alone, a block learns to lean
        # on what the blocks before it got wrong in the first half, and those move again in this one.
        own_pairs = [(args, target) for (args, _), (_, target) in zip(own[site.path], calls[site.path])]
        steps[site.path] += fit(
            site.path, [pair for both in zip(own_pairs, calls[site.path]) for pair in both], share()
        )
    return steps


def copy_from_replaced(block: nn.Module, replaced: nn.Module, calls: list[tuple[tuple, Any]]) -> bool:
    """Let ``block`` copy weights from ``replaced`` through its ``warm_start_from`` hook; whether it kept any.

    The BatchNorm layers the hook left at their fresh statistics get those of their inputs, so that eval-mode
    fitting starts well conditioned. A copy that does not bring the block closer to the recorded outputs (the
    replaced module computes something else than its structure suggested) is undone.
    """
    hook = getattr(block, "warm_start_from", None)
    if not callable(hook) or not calls:
        return False
    with modes_kept(block):
        before = block_error(block, calls)
        fresh = {name: value.clone() for name, value in block.state_dict().items()}
        fresh_means = {norm: norm.running_mean.clone() for norm in norms(block)}
        if not hook(replaced):
            return False
        untouched = [norm for norm, mean in fresh_means.items() if torch.equal(mean, norm.running_mean)]
        estimate_statistics(block, calls, untouched)
        if block_error(block, calls) < before:
            return True
        block.load_state_dict(fresh)
        return False


def fit_half(
    block: nn.Module,
    pairs: list[tuple[tuple, Any]],
    *,
    seconds: float,
    lr: float,
    train_mode: bool,
    bfloat16: bool = False,
) -> int:
    """Fit ``block`` to ``pairs`` (inputs, target output) for ``seconds``, in train mode followed by a
    re-estimate of its statistics, or in eval mode (statistics kept), forward passes in bfloat16 autocast with
    ``bfloat16``; undone if no closer. Returns the steps taken."""
    if not pairs:
        return 0
    checked = pairs[:CHECKED]
    with modes_kept(block):
        before = block_error(block, checked)
        kept = {name: value.clone() for name, value in block.state_dict().items()}
        block.train(train_mode)

        def loss(args: tuple, target: Any) -> Tensor:
            with autocast(block, bfloat16):
                output = block(*args)
            return squared_relative(as_float32(output), target)

        taken = fit(block, list(block.parameters()), loss, pairs, lr, seconds)
        if train_mode:
            estimate_statistics(block, checked, norms(block))
        # A diverged or futile fit: hand the block back as it came.
        if not block_error(block, checked) < before:
            block.load_state_dict(kept)
    return taken


def native_bfloat16(model: nn.Module) -> bool:
    """Whether the device of ``model``'s parameters multiplies bfloat16 natively (then autocast is faster)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# Slim-neck YOLOv5-S, 720 end-to-end steps: 0.0243 of relative error this way (0.0242 with 20 % of cooldown,
# 0.0247 with 50 %), 0.0280 with a cosine decay over all steps, 0.0274 with a linear one. The error still falls
# fast at full rate; a decay that starts early gives that away.
_COOLDOWN = 0.3


def fit(
    model: nn.Module,
    trained: list[nn.Parameter],
    loss: Callable[[tuple, Any], Tensor],
    pairs: list[tuple[tuple, Any]],
    lr: float,
    seconds: float,
) -> int:
    """Train the ``trained`` parameters on ``loss(inputs, target)`` cycling over ``pairs`` for ``seconds``:
    Adam, ``lr`` held, then decayed linearly to zero over the last ``_COOLDOWN`` of the time. Returns the steps
    taken (at least one).

    Modes are the caller's: in train mode BatchNorm normalises by each batch's statistics, which keeps a fit
    from random weights well conditioned while they move (with fixed statistics, the activations' scale
    drifts and the fit crawls); in eval mode the statistics stay, and the block computes what it learnt.
    Every other parameter of ``model`` is frozen meanwhile, so that no gradient is computed for it.
    """
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    # The fused kernel updates every parameter in one call: on a CPU a step takes a third of the time.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trained)
    optimizer = torch.optim.Adam(trained, lr=lr, fused=fused)
    start, taken = time.perf_counter(), 0
    try:
        for p in parameters:
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        with torch.enable_grad():
            for args, target in itertools.cycle(pairs):
                # The first step is taken at full rate whatever the time: a budget spent before it still gets it.
                spent = ((time.perf_counter() - start) / seconds if seconds > 0 else 1.0) if taken else 0.0
                if spent >= 1:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (1 - spent) / _COOLDOWN)
                value = loss(args, target)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                taken += 1
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)
            p.grad = None
    return taken


def norms(block: nn.Module) -> list[nn.Module]:
    """``block``'s BatchNorm layers that keep running statistics."""
    return [
        m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def estimate_statistics(block: nn.Module, pairs: list[tuple[tuple, Any]], norms: list[nn.Module]) -> None:
    """Set the running statistics of ``norms`` (BatchNorm layers of ``block``) to their plain average over the
    inputs, the rest of the block in eval mode; ``block`` is left in eval mode.

    After a train-mode fit the running averages lag behind the weights the fit moved (momentum 0.03 in the GS
    blocks); without this, eval mode would normalise with statistics of weights long gone.
    """
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    block.eval()
    for norm in norms:
        norm.train()
    try:
        with torch.no_grad():
            for args, _ in pairs:
                block(*args)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        block.eval()


@contextlib.contextmanager
def autocast(module: nn.Module, enabled: bool) -> Iterator[None]:
    """bfloat16 autocast on the device of ``module``'s parameters, or nothing when not ``enabled``.

    On a CPU, depthwise convolutions stay float32 inside it: there oneDNN's float32 depthwise kernels (with
    channels-last inputs) are faster than its bfloat16 ones, backward pass included.
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
        if enabled and device.type == "cpu":
            with _Float32Depthwise():
                yield
        else:
            yield


class _Float32Depthwise(TorchFunctionMode):
    """Runs every depthwise ``conv2d`` (one input channel per group) with autocast off, in float32; its output
    goes back to the input's dtype, so that what follows runs as it would have."""

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.conv2d:
            signature = _CONV2D.bind(*args, **kwargs)
            weight, groups = signature.arguments["weight"], signature.arguments.get("groups", 1)
            if groups > 1 and weight.shape[1] == 1:
                dtype = signature.arguments["input"].dtype
                signature.arguments["input"] = signature.arguments["input"].float()
                with torch.autocast("cpu", enabled=False):
                    return func(*signature.args, **signature.kwargs).to(dtype)
        return func(*args, **kwargs)


_CONV2D = inspect.Signature(
    [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in [
            ("input", inspect.Parameter.empty),
            ("weight", inspect.Parameter.empty),
            ("bias", None),
            ("stride", 1),
            ("padding", 0),
            ("dilation", 1),
            ("groups", 1),
        ]
    ]
)


def as_float32(value: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.float() if isinstance(t, Tensor) and t.dtype == torch.bfloat16 else t, value
    )
