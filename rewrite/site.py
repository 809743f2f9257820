"""What the matcher found at one place of the model: the facts ``where`` tests and builders consume.

:class:`Site` is plain data handed from the matcher to the rule's ``where`` predicates, to derivations and to
the builder; it has no behaviour beyond naming its facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Site"]

_SPATIAL_FACTS = ("kernel_size", "stride", "dilation", "padding")


@dataclass(frozen=True)
class Site:
    """What the matcher found at one match: the facts ``where`` predicates test and builders consume.

    Spatial facts (``kernel_size``, ``stride``, ``dilation``, ``padding``) are stored as one int when equal
    along every dimension, as rule files write them, else as a tuple. A fact the site does not have (a
    kernel size where the match holds no conv) is ``None``. ``activation`` and ``norm`` are the matched
    modules, so new blocks can copy the activation and inherit the norm's eps/momentum; ``counts`` maps class
    names to how many modules of that class the match contains.

    >>> site = Site("model.10", "conv-to-gsconv", "Conv2d", in_channels=64, out_channels=32,
    ...             kernel_size=(3, 3), stride=(2, 2), groups=1, activation=nn.SiLU())
    >>> site.kernel_size, site.facts()["activation"], site.facts()["depthwise"]
    (3, 'SiLU', False)
    """

    # The facts `where` may test, with the types of their values (a tuple for non-square spatial facts).
    FACT_TYPES: ClassVar[Mapping[str, tuple[type, ...]]] = MappingProxyType(
        {
            "in_channels": (int,),
            "out_channels": (int,),
            "kernel_size": (int, tuple),
            "stride": (int, tuple),
            "groups": (int,),
            "dilation": (int, tuple),
            "padding": (int, tuple, str),
            "bias": (bool,),
            "depthwise": (bool,),
            "same_size": (bool,),
            "activation": (str,),
            "module_type": (str,),
        }
    )

    path: str
    rule: str
    module_type: str
    in_channels: int | None = None
    out_channels: int | None = None
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    stride: int | tuple[int, ...] | None = None
    kernel_size: int | tuple[int, ...] | None = None
    groups: int | None = None
    dilation: int | tuple[int, ...] | None = None
    padding: int | tuple[int, ...] | str | None = None
    bias: bool | None = None
    activation: nn.Module | None = None
    norm: nn.Module | None = None
    counts: Mapping[str, int] = field(default_factory=dict, hash=False)
    # For a match of one module: how many modules each of its direct children holds directly ({"m": 3}).
    lengths: Mapping[str, int] = field(default_factory=dict, hash=False)
    device: torch.device | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in _SPATIAL_FACTS:
            value = getattr(self, name)
            if isinstance(value, tuple) and len(set(value)) == 1:
                object.__setattr__(self, name, value[0])

    def facts(self) -> dict[str, Any]:
        """The facts by name (the keys of ``FACT_TYPES``), for ``where`` predicates and ``{ fact = ... }``."""
        depthwise = None
        if self.groups is not None and self.in_channels is not None:
            depthwise = self.groups > 1 and self.groups == self.in_channels
        same_size = None
        if self.in_shape is not None and self.out_shape is not None and len(self.in_shape) > 2:
            strides = (
                self.stride
                if isinstance(self.stride, tuple)
                else (self.stride or 1,) * (len(self.in_shape) - 2)
            )
            same_size = self.out_shape[2:] == tuple(-(-n // s) for n, s in zip(self.in_shape[2:], strides))
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "groups": self.groups,
            "dilation": self.dilation,
            "padding": self.padding,
            "bias": self.bias,
            "depthwise": depthwise,
            "same_size": same_size,
            "activation": type(self.activation).__name__ if self.activation is not None else None,
            "module_type": self.module_type,
        }
