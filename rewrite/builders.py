"""Replacement builders: functions that turn one matched site into a new ``nn.Module``, registered by name.

A rule's ``replace.builder`` names a builder and its other ``replace`` keys are the builder's options: the
keyword parameters after the :class:`Site`, checked against the signature (names and annotated types) when the
rule file loads. Register your own builder before loading a rule file that names it:

>>> from torch import nn
>>> @register_builder("Pointwise")
... def pointwise(site: Site, *, bias: bool = False) -> nn.Module:
...     return nn.Conv2d(site.in_channels, site.out_channels, 1, site.stride, bias=bias)
>>> "Pointwise" in list_builders(), list(builder_options("Pointwise"))
(True, ['bias'])

Built in: ``GSConv``, ``GSBottleneck`` and ``VoVGSCSP`` (the blocks of :mod:`rewrite.blocks`). The matcher
builds the :class:`Site`; the caller turns the rule's derived options into values for it
(``Derivation.derive``) and calls :func:`build`, which places the new module on the site's device and dtype.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

import torch
from torch import nn

from rewrite.blocks import GSBottleneck, GSConv, ShuffleVariant, VoVGSCSP
from rewrite.errors import BuildError
from rewrite.site import Site
from rewrite.vocabulary import ACTIVATION_NAMES

__all__ = [
    "Site",
    "Valid",
    "build",
    "builder_options",
    "check_option",
    "get_builder",
    "list_builders",
    "register_builder",
]

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

# What ``activation`` options accept: the site's own activation, or one of the op table's by name.
ActivationName = Literal[("inherit", *ACTIVATION_NAMES)]  # type: ignore[valid-type]


@dataclass(frozen=True)
class Valid:
    """The values a numeric builder option can work with, declared on the builder with ``Annotated``.

    Rule files are checked against it when they load, and derived values (``{ fact = ... }``) when a site is
    built, so a value that cannot work fails early in one line instead of deep inside a block. A number must
    also be finite: NaN and infinity never make a layer.

    >>> @register_builder("Blur")
    ... def blur(site: Site, *, size: Annotated[int, Valid(ge=1, odd=True)] = 3) -> nn.Module:
    ...     return nn.AvgPool2d(size, 1, size // 2)
    >>> check_option("Blur", "size", 4)
    'Blur expects an odd integer >= 1, got 4'
    >>> check_option("Blur", "size", 5) is None
    True
    """

    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    odd: bool = False  # odd integers only (a "same"-padded kernel: k // 2 keeps the size only when k is odd)

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is in range; a value that is not a number is left to the type check."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        return (
            math.isfinite(value)
            and (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (not self.odd or value % 2 == 1)
        )

    def describe(self, kind: str) -> str:
        """The valid values in words, ``kind`` naming the type: ``an odd integer >= 1``, ``a number > 0``."""
        if self.odd:
            kind = kind.replace("an integer", "an odd integer")
        bounds = [
            f"{op} {bound:g}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le))
            if bound is not None
        ]
        return " and ".join([f"{kind} {bounds[0]}", *bounds[1:]]) if bounds else kind


@dataclass(frozen=True)
class _Registered:
    builder: Callable[..., nn.Module]
    options: Mapping[str, inspect.Parameter]
    valid: Mapping[str, tuple[Valid, ...]]  # declared ranges, by option


_REGISTRY: dict[str, _Registered] = {}


def register_builder(name: str, *, override: bool = False) -> Callable[[Builder], Builder]:
    """Register a builder under ``name`` (case-sensitive); a decorator that returns the function unchanged.

    The builder takes the :class:`Site` first, then its options as named parameters (no ``*args`` or
    ``**kwargs``, so rule files can be checked against them). Annotate the options: rule values are checked
    against ``int``, ``float``, ``str``, ``bool``, ``Literal[...]`` and unions of those; an option without
    annotation is checked against its default's type. Registering a taken name raises ``ValueError`` unless
    ``override=True``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError('register_builder takes the builder\'s name: write @register_builder("Name")')

    def register(builder: Builder) -> Builder:
        if name in _REGISTRY and not override:
            raise ValueError(
                f"a builder named {name!r} is already registered; pass override=True to replace it"
            )
        options, valid = _options_of(name, builder)
        _REGISTRY[name] = _Registered(builder, MappingProxyType(options), MappingProxyType(valid))
        return builder

    return register


def get_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; ``KeyError`` when there is none (rule files check at load)."""
    if name not in _REGISTRY:
        raise KeyError(f"no builder named {name!r}; registered: {', '.join(list_builders())}")
    return _REGISTRY[name].builder


def list_builders() -> list[str]:
    """The registered builder names, sorted."""
    return sorted(_REGISTRY)


def builder_options(name: str) -> Mapping[str, inspect.Parameter]:
    """A builder's options by name, their ``annotation`` resolved to the type the rule loader checks values
    against (``typing.Any`` when neither annotation nor default says)."""
    get_builder(name)  # the same KeyError for an unknown name
    return _REGISTRY[name].options


def check_option(builder: str, option: str, value: Any) -> str | None:
    """``None`` when ``value`` is in the range that ``builder`` declares for ``option`` (see :class:`Valid`),
    else the reason, as ``"GSConv expects an odd integer >= 1, got -3"``.

    >>> check_option("VoVGSCSP", "n", -2)
    'VoVGSCSP expects an integer >= 1, got -2'
    """
    get_builder(builder)  # the same KeyError for an unknown name
    registered = _REGISTRY[builder]
    for valid in registered.valid.get(option, ()):
        if not valid.admits(value):
            kind = "an integer" if registered.options[option].annotation is int else "a number"
            return f"{builder} expects {valid.describe(kind)}, got {value}"
    return None


def build(builder: str, site: Site, options: Mapping[str, Any]) -> nn.Module:
    """Build the builder registered as ``builder`` for ``site`` with ``options`` (derivations already resolved),
    on the site's device and dtype.

    Anything the builder raises (an odd channel count for GSConv, say) becomes a one-line
    :class:`~rewrite.errors.BuildError` naming the site and the rule.
    """
    # The new block must never hold the user's own modules: ``.to()`` below would move them, and training the
    # block would train them. The builder gets copies of the matched activation and norm.
    site = dataclasses.replace(site, activation=copy.deepcopy(site.activation), norm=copy.deepcopy(site.norm))
    try:
        # Derived values are only known per site: check them against the declared ranges as rule values were.
        for option, value in options.items():
            problem = check_option(builder, option, value)
            if problem:
                raise ValueError(f"{problem} (replace.{option})")
        # Made where it will live: on meta, no weights are drawn (and no random numbers).
        with torch.device(site.device) if site.device is not None else contextlib.nullcontext():
            module = get_builder(builder)(site, **options)
        if not isinstance(module, nn.Module):
            raise TypeError(f"the builder returned {type(module).__name__}, not an nn.Module")
        placement = {"device": site.device, "dtype": site.dtype}
        return module.to(**{key: value for key, value in placement.items() if value is not None})
    except Exception as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise BuildError(f"site {site.path!r}: rule {site.rule!r}: cannot build {builder}: {detail}") from exc


def _options_of(
    name: str, builder: Callable[..., nn.Module]
) -> tuple[dict[str, inspect.Parameter], dict[str, tuple[Valid, ...]]]:
    """The options with their annotations resolved (``Annotated`` stripped), and the ranges declared on them."""
    parameters = list(inspect.signature(builder).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not parameters or parameters[0].kind not in positional:
        raise TypeError(f"builder {name!r} must take the Site as its first positional parameter")
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for parameter in parameters[1:]:
        if parameter.kind not in named:
            raise TypeError(
                f"builder {name!r}: option {parameter.name!r} must be a named parameter, passable by keyword"
            )
    try:
        hints = typing.get_type_hints(builder, include_extras=True)
    except (NameError, TypeError):  # a forward reference we cannot resolve: fall back to the defaults' types
        hints = {}
    valid = {}
    for option, hint in hints.items():
        if typing.get_origin(hint) is Annotated:
            hints[option] = hint.__origin__
            valid[option] = tuple(item for item in hint.__metadata__ if isinstance(item, Valid))
    options = {p.name: p.replace(annotation=_option_type(p, hints)) for p in parameters[1:]}
    return options, {option: checks for option, checks in valid.items() if option in options and checks}


def _option_type(parameter: inspect.Parameter, hints: Mapping[str, Any]) -> Any:
    if parameter.name in hints:
        return hints[parameter.name]
    if parameter.default is not inspect.Parameter.empty and parameter.default is not None:
        return type(parameter.default)
    return Any


def _known(site: Site, fact: str) -> Any:
    value = getattr(site, fact)
    if value is None:
        raise ValueError(f"{fact} unknown for {site.module_type}")
    return value


def _activation(name: ActivationName, site: Site) -> nn.Module | bool:
    """The ``act`` argument of the GS blocks: they copy a module per layer, and ``False`` means Identity."""
    if name == "inherit":
        return site.activation if site.activation is not None else False
    return ACTIVATION_NAMES[name]()


def _norm_settings(site: Site) -> dict[str, Any]:
    """eps/momentum of the matched norm, so the new BatchNorms behave like the ones they replace."""
    return {
        f"bn_{name}": getattr(site.norm, name) for name in ("eps", "momentum") if hasattr(site.norm, name)
    }


def _gs_settings(site: Site, activation: str, dw_kernel: int, shuffle: str) -> dict[str, Any]:
    """The keywords every GS block takes: activation, depthwise kernel, shuffle, and the site's norm settings."""
    return {
        "act": _activation(activation, site),
        "dw_kernel": dw_kernel,
        "shuffle": shuffle,
        **_norm_settings(site),
    }


def _same_size_block(
    block: type[nn.Module],
    site: Site,
    shape: int,
    expansion: float,
    activation: ActivationName,
    dw_kernel: int,
    shuffle: str,
) -> nn.Module:
    """GSBottleneck (``shape`` its kernel size) or VoVGSCSP (``shape`` its number of bottlenecks) for ``site``:
    the two blocks whose builders take the same options, and keep the spatial size."""
    # These blocks have no stride: a strided site would change the output size.
    if site.stride not in (None, 1):
        raise ValueError(f"{block.__name__} keeps the spatial size, but the site has stride {site.stride}")
    in_channels, out_channels = _known(site, "in_channels"), _known(site, "out_channels")
    settings = _gs_settings(site, activation, dw_kernel, shuffle)
    return block(in_channels, out_channels, shape, expansion=expansion, **settings)


# The ranges of the built-in blocks' options. The GS blocks pad their convs by kernel // 2, which keeps the
# spatial size only for odd kernels; a width of expansion * channels needs expansion > 0.
Kernel = Annotated[int, Valid(ge=1, odd=True)]
Expansion = Annotated[float, Valid(gt=0)]


@register_builder("GSConv")
def _gsconv(
    site: Site,
    *,
    shuffle: ShuffleVariant = "split",
    dw_kernel: Kernel = 5,
    activation: ActivationName = "inherit",
) -> nn.Module:
    """GSConv(in_channels, out_channels, kernel_size, stride) for a conv site.

    ``groups`` is not carried over: GSConv's dense half is what mixes channels (its cheapness comes from the
    depthwise half), and a depthwise site could not be split that way; rules select ``groups = 1``.
    """
    if site.dilation not in (None, 1):
        raise ValueError(f"GSConv has no dilation, but the site's is {site.dilation}; add where.dilation = 1")
    return GSConv(
        _known(site, "in_channels"),
        _known(site, "out_channels"),
        _known(site, "kernel_size"),
        _known(site, "stride"),
        **_gs_settings(site, activation, dw_kernel, shuffle),
    )


@register_builder("GSBottleneck")
def _gs_bottleneck(
    site: Site,
    *,
    kernel_size: Kernel = 3,
    expansion: Expansion = 0.5,
    shuffle: ShuffleVariant = "split",
    dw_kernel: Kernel = 5,
    activation: ActivationName = "inherit",
) -> nn.Module:
    """GSBottleneck(in_channels, out_channels, kernel_size, expansion) for a bottleneck-like site."""
    return _same_size_block(GSBottleneck, site, kernel_size, expansion, activation, dw_kernel, shuffle)


@register_builder("VoVGSCSP")
def _vovgscsp(
    site: Site,
    *,
    n: Annotated[int, Valid(ge=1)] = 1,
    expansion: Expansion = 0.5,
    shuffle: ShuffleVariant = "split",
    dw_kernel: Kernel = 5,
    activation: ActivationName = "inherit",
) -> nn.Module:
    """VoVGSCSP(in_channels, out_channels, n, expansion) for a CSP-like site of stride 1."""
    return _same_size_block(VoVGSCSP, site, n, expansion, activation, dw_kernel, shuffle)
