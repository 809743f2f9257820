"""Models built from code, registered by name.

A builder is a function that returns an ``nn.Module``; ``@register_model`` files it under its own name, and
``create_model(name, **kwargs)`` calls it. Build on the meta device to get the structure without weights:

>>> import torch
>>> from rewrite.zoo import create_model, list_models
>>> "yolov5s" in list_models()
True
>>> with torch.device("meta"):
...     model = create_model("yolov5s", nc=20)
>>> model.yaml["nc"], model.model[-1].no
(20, 25)
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from rewrite.errors import ModelSpecError

__all__ = ["create_model", "list_models", "register_model"]

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Builder) -> Builder:
    """Register ``builder`` under its ``__name__``; a decorator that returns the builder unchanged."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"a model named {name!r} is already registered")
    _BUILDERS[name] = builder
    return builder


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_BUILDERS)


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name``, passing ``kwargs`` to its builder.

    An unknown name, or an argument the builder does not take, raises :class:`~rewrite.errors.ModelSpecError`.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _BUILDERS, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ModelSpecError(f"unknown model {name!r}; {hint}available: {', '.join(list_models())}") from None
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelSpecError(
            f"model {name!r} takes no argument {unknown[0]!r}; it takes: {', '.join(accepted) or 'none'}"
        )
    try:
        return builder(**kwargs)
    except ModelSpecError as error:  # a builder's own check of its arguments: say which model
        raise ModelSpecError(f"model {name!r}: {error}") from None


# Imported last, for its side effect: its builders use register_model, defined above.
from rewrite.zoo import yolov5  # noqa: F401
