"""What warm start does to modules for a while and undoes: forward hooks, and their train / eval modes."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn


@contextlib.contextmanager
def forward_hooks(
    modules: Mapping[str, nn.Module],
    *,
    before: Callable[[str, nn.Module, tuple], None] | None = None,
    after: Callable[[str, nn.Module, tuple, Any], None] | None = None,
) -> Iterator[None]:
    """While inside, ``before(path, module, args)`` runs as each module of ``modules`` (by path) is called and
    ``after(path, module, args, output)`` as it returns; both only look (they return nothing, so the call's
    arguments and output stay). Every hook is removed on the way out, an error included."""
    handles = []
    try:
        for path, module in modules.items():
            if before is not None:
                handles.append(module.register_forward_pre_hook(functools.partial(before, path)))
            if after is not None:
                handles.append(module.register_forward_hook(functools.partial(after, path)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module's train/eval mode back as it was on the way out."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
