"""The last phase: all new blocks together, with what runs only after them, on the whole model's outputs;
what runs before the first new block is replayed from one recorded pass."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rewrite.paths import parent_path, path_and_ancestors
from rewrite.warm_start.fitting import as_float32, autocast, fit
from rewrite.warm_start.hooks import forward_hooks, modes_kept
from rewrite.warm_start.measure import detached, relative_error, squared_norms, squared_relative


def fit_end_to_end(
    model: nn.Module,
    blocks: list[nn.Module],
    inputs: list[tuple],
    targets: list[Any],
    *,
    lr: float,
    seconds: float,
    bfloat16: bool = False,
) -> tuple[int, list[str]]:
    """Train ``blocks`` together, in eval mode, with the modules that run only after the first block has
    started, on the whole ``model``'s relative output error (forward passes in bfloat16 autocast with
    ``bfloat16``), for ``seconds``; undone if no better. Returns the steps taken and the paths of those modules.

    What the model computes before the first new block runs does not change while they train: the outermost
    modules that run, once per forward, entirely before it are replayed from one recorded pass instead of
    computed again at every step (the backbone of a detector whose neck was rewritten), when replaying
    reproduces the model's outputs; otherwise every step runs the whole model.
    """
    with modes_kept(model):
        model.eval()
        order = _call_order(model, blocks, inputs[0])
        prefix, recorded, outputs = _prefix_outputs(model, order, inputs)
        before = relative_error(outputs, targets)
        trained = [p for block in blocks for p in block.parameters()]
        tuned = _downstream(model, order)
        known = {id(p) for p in trained}
        # What the user froze (a DFL's fixed projection, say) stays frozen.
        trained += [
            p
            for module in tuned.values()
            for p in module.parameters()
            if p.requires_grad and id(p) not in known
        ]
        kept = [p.detach().clone() for p in trained]  # eval mode: parameters are all that can change
        with _replayed(prefix, recorded) as replay:

            def replayed(index: int, args: tuple) -> Any:
                replay.batch = index
                return model(*args)

            def error() -> float:
                with torch.no_grad():
                    return relative_error(
                        [replayed(index, args) for index, args in enumerate(inputs)], targets
                    )

            if not math.isclose(error(), before, rel_tol=1e-4):
                replay.clear()  # the forward does not run the same way every time: compute everything

            references = [squared_norms(target) for target in targets]

            def loss(args: tuple, target_and_index: tuple[Any, int]) -> Tensor:
                target, index = target_and_index
                with autocast(model, bfloat16):
                    output = replayed(index, args)
                return squared_relative(as_float32(output), target, references[index])

            pairs = [(args, (target, index)) for index, (args, target) in enumerate(zip(inputs, targets))]
            taken = fit(model, trained, loss, pairs, lr, seconds)
            after = error()
        if not after < before:
            with torch.no_grad():
                for parameter, value in zip(trained, kept):
                    parameter.copy_(value)
    return taken, sorted(tuned)


@dataclass(frozen=True)
class _CallOrder:
    """When each submodule of a model ran in one forward pass: per module, the ``[start, end]`` events of
    each of its calls, in one count shared by all; the ids of the new blocks' modules; and the event that
    started the first call into one of them."""

    spans: dict[nn.Module, list[list[float]]]
    in_blocks: frozenset[int]
    first_block_start: float

    def ran_before_blocks(self, module: nn.Module) -> bool:
        return any(start < self.first_block_start for start, _ in self.spans.get(module, []))


def _call_order(model: nn.Module, blocks: list[nn.Module], args: tuple) -> _CallOrder:
    in_blocks = frozenset(id(m) for block in blocks for m in block.modules())
    events = itertools.count()
    spans: dict[nn.Module, list[list[float]]] = {}
    first_block_start = math.inf

    def started(path: str, module: nn.Module, args: tuple) -> None:
        nonlocal first_block_start
        event = next(events)
        spans.setdefault(module, []).append([event, math.inf])
        if id(module) in in_blocks:
            first_block_start = min(first_block_start, event)

    def ended(path: str, module: nn.Module, args: tuple, output: Any) -> None:
        spans[module][-1][1] = next(events)

    modules = {path: m for path, m in model.named_modules() if m is not model}
    with forward_hooks(modules, before=started, after=ended), torch.no_grad():
        model(*args)
    return _CallOrder(spans, in_blocks, first_block_start)


def _prefix_outputs(
    model: nn.Module, order: _CallOrder, inputs: list[tuple]
) -> tuple[list[nn.Module], list[list[Any]], list[Any]]:
    """The outermost modules of ``model`` called exactly once per forward, every call ending before the first
    new block starts; per batch their outputs; and per batch the model's outputs (eval mode, no gradient)."""
    spans = order.spans
    modules = {path: m for path, m in model.named_modules() if m is not model}
    early = {
        path
        for path, m in modules.items()
        if len(spans.get(m, [])) == 1 and spans[m][0][1] < order.first_block_start
    }
    prefix = {path: m for path, m in modules.items() if path in early and not _below(path, early)}
    recorded: list[list[Any]] = []
    outputs: list[Any] = []

    def recorder(path: str, module: nn.Module, args: tuple, output: Any) -> None:
        recorded[-1].append(detached(output))

    with forward_hooks(prefix, after=recorder), torch.no_grad():
        for args in inputs:
            recorded.append([])
            outputs.append(detached(model(*args)))
    if any(len(batch) != len(prefix) for batch in recorded):
        return [], [], outputs
    # The hooks fire in call order, not in the order of ``prefix``: pair them up by that order.
    return sorted(prefix.values(), key=lambda m: spans[m][0][1]), recorded, outputs


def _downstream(model: nn.Module, order: _CallOrder) -> dict[str, nn.Module]:
    """By path, the outermost modules outside the new blocks that hold parameters and ran, every time, after
    the first new block had started, sharing no parameter with a module that ran before it (training that one
    would change what the replayed prefix computes)."""
    early = {
        id(p) for m in model.modules() if order.ran_before_blocks(m) for p in m.parameters(recurse=False)
    }
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        later = module in order.spans and not order.ran_before_blocks(module)
        if not later or id(module) in order.in_blocks or any(path.startswith(f"{p}.") for p in found):
            continue
        parameters = list(module.parameters())
        if parameters and not any(id(p) in early for p in parameters):
            found[path] = module
    return found


def _below(path: str, paths: set[str]) -> bool:
    """Whether a module that holds the one at ``path`` has one of ``paths``.

    >>> _below("neck.1.conv", {"neck"}), _below("neck", {"neck"}), _below("neck.1", {"ne"})
    (True, False, False)
    """
    return any(holder in paths for holder in path_and_ancestors(parent_path(path)) if holder)


class _Replay:
    """While active, each prefix module's forward returns its recorded output for batch ``batch``."""

    def __init__(self, modules: list[nn.Module], recorded: list[list[Any]]) -> None:
        self.modules, self.recorded, self.batch = modules, recorded, 0

    def clear(self) -> None:
        for module in self.modules:
            del module.forward  # the instance attribute goes: the class's forward is back
        self.modules = []

    def install(self) -> None:
        for position, module in enumerate(self.modules):
            module.forward = functools.partial(self._output, position)

    def _output(self, position: int, *args: Any, **kwargs: Any) -> Any:
        return self.recorded[self.batch][position]


@contextlib.contextmanager
def _replayed(modules: list[nn.Module], recorded: list[list[Any]]) -> Iterator[_Replay]:
    replay = _Replay(modules, recorded)
    replay.install()
    try:
        yield replay
    finally:
        replay.clear()
