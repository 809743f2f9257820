"""Where the new blocks are, and what each stands for in the original: from a plan's sites, from paths the
caller names, or found by :func:`changed_modules`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from rewrite.errors import InputSpecError
from rewrite.planner import Plan
from rewrite.vocabulary import is_idempotent
from rewrite.warm_start.hooks import forward_hooks, modes_kept


def changed_modules(rewritten: nn.Module, original: nn.Module) -> list[str]:
    """The paths of ``rewritten``'s new blocks: outermost modules of another class than ``original``'s at the
    same path, or at a path ``original`` lacks (a graph rewrite's block, inside the fx graph module that took a
    region's place; such a graph module is looked into, not listed).

    A module with no parameters or buffers is no block of its own: the ``nn.Identity`` standing where a
    BatchNorm was, once a conv -> norm -> activation chain became one block, belongs to that block.

    >>> from torch import nn
    >>> before = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
    >>> after = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU()), nn.Identity(),
    ...                       nn.Identity())
    >>> changed_modules(after, before)
    ['0']
    """
    originals = dict(original.named_modules())
    found: list[str] = []
    for path, new in rewritten.named_modules():
        if not path or any(path.startswith(prefix + ".") for prefix in found):
            continue
        old = originals.get(path)
        if isinstance(new, fx.GraphModule) and not isinstance(old, fx.GraphModule):
            continue  # a region's graph: it holds the original's modules under their own names
        if old is not None and type(new) is type(old):
            continue
        if next(itertools.chain(new.parameters(), new.buffers()), None) is not None:
            found.append(path)
    return found


@dataclass(frozen=True)
class BlockSite:
    """A new block at ``path`` of the rewritten model and what it stands for in the original: the module at
    ``path`` there, or the chain of modules starting there (as one ``nn.Sequential``); ``None`` when the
    original has no module to compare it with (a graph rewrite's block)."""

    path: str
    replaced: nn.Module | None
    name: str  # the replaced module's class name, or the chain's joined by "+"
    chained: bool = False  # ``replaced`` is a chain: the original's first module's output feeds the rest

    def target(self, output: Any) -> Any:
        """The site's output in the original, from the output of its first module there."""
        return self.replaced[1:](output) if self.chained else output


def resolve_sites(
    rewritten: nn.Module, original: nn.Module, sites: Plan | Sequence[str] | None, example: tuple
) -> tuple[list[BlockSite], dict[str, str]]:
    """The sites to warm-start, and the paths skipped with the reason."""
    found = changed_modules(rewritten, original)
    if isinstance(sites, Plan):
        chains = {change.path: change.modules for change in sites.sites if change.kind != "graph"}
        missing = [path for path in chains if path not in found]
        if missing:
            raise InputSpecError(
                f"warm_start: the plan's site {missing[0]!r} holds no new block in {type(rewritten).__name__}; "
                "pass the model this plan's apply() returned"
            )
        originals = dict(original.named_modules())
        paths = [*chains, *(path for path in found if path not in originals)]  # graph sites' blocks
    elif sites is None:
        paths, chains = found, {}
    else:
        paths = list(sites)
        unknown = next((path for path in paths if not holds(rewritten, path)), None)
        if unknown is not None:
            raise InputSpecError(
                f"warm_start: sites names {unknown!r}, which {type(rewritten).__name__} does not hold; pass "
                "the paths of its new blocks (rewrite.warm_start.changed_modules lists them)"
            )
        chains = {}
    unchained = [path for path in paths if path not in chains and holds(original, path)]
    chains.update(_chains(rewritten, original, unchained, example) if unchained else {})

    resolved, skipped = [], {}
    for path in paths:
        if not any(p.requires_grad for p in rewritten.get_submodule(path).parameters()):
            skipped[path] = "its new block has no trainable parameters"
            continue
        chain = [original.get_submodule(p) for p in chains.get(path, ())]
        if not chain:
            resolved.append(BlockSite(path, None, "ops"))
        elif len(chain) == 1:
            resolved.append(BlockSite(path, chain[0], type(chain[0]).__name__))
        else:
            name = "+".join(type(module).__name__ for module in chain)
            resolved.append(BlockSite(path, nn.Sequential(*chain), name, chained=True))
    return resolved, skipped


def holds(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _chains(
    rewritten: nn.Module, original: nn.Module, paths: list[str], example: tuple
) -> dict[str, tuple[str, ...]]:
    """Per new block at one of ``paths``, the original's modules it stands for, found from one forward pass of
    ``rewritten``: the block, then the ``nn.Identity`` modules it feeds in a row where the original has other
    modules (a chain of a larger forward became the block), then an idempotent activation the forward calls
    more than once, kept in place after the chain (a ResNet block's one ``relu``)."""
    blocks = {id(rewritten.get_submodule(path)) for path in paths}
    inside = {id(m) for path in paths for m in rewritten.get_submodule(path).modules()} - blocks
    # In the order the calls return: path, module, first argument and its version, output and its version (a
    # value changed in place between two calls, `out += identity`, is another value).
    completed: list[tuple[str, nn.Module, Any, Any]] = []
    arguments: list[Any] = []  # per call under way, innermost last: its first argument as it came
    counts: dict[int, int] = {}

    def called(path: str, module: nn.Module, args: tuple) -> None:
        arguments.append(_versioned(args[0] if args else None))

    def returned(path: str, module: nn.Module, args: tuple, output: Any) -> None:
        counts[id(module)] = counts.get(id(module), 0) + 1
        completed.append((path, module, arguments.pop(), _versioned(output)))

    watched = {path: m for path, m in rewritten.named_modules(remove_duplicate=False) if id(m) not in inside}
    with modes_kept(rewritten), torch.no_grad(), forward_hooks(watched, before=called, after=returned):
        rewritten.eval()
        rewritten(*example)
    chains = {}
    for path in paths:
        index = next((i for i, call in enumerate(completed) if call[0] == path), None)
        chain = [path]
        while index is not None and index + 1 < len(completed):
            index += 1
            next_path, module, argument, _ = completed[index]
            if argument != completed[index - 1][3] or not holds(original, next_path):
                break
            replaced = original.get_submodule(next_path)
            if isinstance(module, nn.Identity) and not isinstance(replaced, nn.Identity):
                chain.append(next_path)
                continue
            if type(module) is type(replaced) and is_idempotent(module) and counts[id(module)] > 1:
                chain.append(next_path)
            break
        chains[path] = tuple(chain)
    return chains


def _versioned(value: Any) -> tuple[int, int] | None:
    """A tensor's identity and in-place version: equal for the same value, unequal once changed in place."""
    return (id(value), value._version) if isinstance(value, Tensor) else None
