"""Random small conv networks, described by plain frozen dataclasses so that a failing one prints as code.

``nets()`` is the hypothesis strategy of :mod:`tests.test_properties`; ``build(spec)`` turns a :class:`Net` into
an ``nn.Module``. A description that hypothesis shrinks to can be pasted into a regression test as is:

>>> model = build(Net((Conv(4, act="F.relu"), Residual((Conv(4, k=1),)))))
>>> model(torch.rand(1, 3, 16, 16)).shape
torch.Size([1, 4, 16, 16])
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

INPUT_SHAPE = (1, 3, 16, 16)
# Convs after the stem, at most: planning costs a few runs of the model per site, and 200 nets must stay quick.
MAX_CONVS = 3

# Activations by how a forward calls them: a module of its own, a function, a tensor method, or one module
# object that several units share (registered under each of their paths).
MODULE_ACTIVATIONS = ("ReLU", "SiLU", "Hardswish", "LeakyReLU", "Sigmoid", "Identity", "PReLU")
FUNCTION_ACTIVATIONS = {
    "F.relu": F.relu,
    "F.silu": F.silu,
    "torch.sigmoid": torch.sigmoid,
    "F.hardswish": F.hardswish,
}
METHOD_ACTIVATIONS = (".relu", ".sigmoid")
SHARED = "shared"


@dataclass(frozen=True)
class Conv:
    """``Conv2d`` → optional ``BatchNorm2d`` → optional activation. ``flat``: the three are parts of the
    enclosing block's forward; otherwise they sit in a unit module of their own. ``same``: padding keeps the
    size (``dilation * (k // 2)``), else no padding."""

    out: int
    k: int = 3
    stride: int = 1
    groups: int = 1
    dilation: int = 1
    bias: bool = False
    norm: bool = True
    act: str | None = "ReLU"
    flat: bool = False
    same: bool = True


@dataclass(frozen=True)
class Twice:
    """One conv unit (channels kept, stride 1) called twice in a row."""

    conv: Conv


@dataclass(frozen=True)
class Residual:
    """``x + body(x)``; the body keeps channels and size."""

    body: tuple


@dataclass(frozen=True)
class Concat:
    """``cat([left(x), right(x)], 1)``; both keep the size."""

    left: tuple
    right: tuple


@dataclass(frozen=True)
class Gate:
    """A module whose forward branches on a tensor's value (fx cannot trace it, meta cannot run it)."""


@dataclass(frozen=True)
class Counter:
    """A module that updates a buffer in place on every call (as BatchNorm's ``num_batches_tracked`` does)."""


@dataclass(frozen=True)
class Nest:
    """The body as a submodule of its own."""

    body: tuple


@dataclass(frozen=True)
class Net:
    """The root: its layers, what it returns (``tensor``, ``tuple`` or ``dict``), the shared activation's
    class, a seed for which modules are put in train mode, and whether a forward hook sits on one of them."""

    body: tuple
    outputs: str = "tensor"
    shared: str = "ReLU"
    mode_seed: int | None = None
    hook: bool = False


# --- building ---------------------------------------------------------------------------------------------


class Unit(nn.Module):
    def __init__(
        self, conv: nn.Module, norm: nn.Module | None, act: nn.Module | None, fn: str | None
    ) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.act = act
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return _call_activation(self.fn, x)


class TwiceUnit(nn.Module):
    def __init__(self, unit: Unit) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(self.unit(x))


class GateModule(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0.5:
            return x * 0.5
        return x


class CounterModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


class Block(nn.Module):
    """Runs its parts in order; ``kinds`` says how each one is wired (a static list: fx traces the loop)."""

    def __init__(self, layers: tuple, channels: int, shared: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList()
        self.kinds: list[str] = []
        for layer in layers:
            channels = self._add(layer, channels, shared)
        self.out_channels = channels

    def _add(self, layer: object, channels: int, shared: nn.Module) -> int:
        if isinstance(layer, Conv):
            conv, norm, act, fn = _conv_parts(layer, channels, shared)
            if layer.flat:
                for part in (conv, norm, act):
                    if part is not None:
                        self.parts.append(part)
                        self.kinds.append("call")
                if fn is not None:
                    self.parts.append(nn.Identity())  # a placeholder: the kind carries the function
                    self.kinds.append("fn:" + fn)
            else:
                self.parts.append(Unit(conv, norm, act, fn))
                self.kinds.append("call")
            return layer.out
        if isinstance(layer, Twice):
            conv, norm, act, fn = _conv_parts(layer.conv, channels, shared)
            self.parts.append(TwiceUnit(Unit(conv, norm, act, fn)))
            self.kinds.append("call")
            return channels
        if isinstance(layer, (Gate, Counter)):
            self.parts.append(GateModule() if isinstance(layer, Gate) else CounterModule())
            self.kinds.append("call")
            return channels
        if isinstance(layer, Residual):
            self.parts.append(Block(layer.body, channels, shared))
            self.kinds.append("residual")
            return channels
        if isinstance(layer, Concat):
            left, right = Block(layer.left, channels, shared), Block(layer.right, channels, shared)
            self.parts.append(nn.ModuleList([left, right]))
            self.kinds.append("concat")
            return left.out_channels + right.out_channels
        assert isinstance(layer, Nest), layer
        block = Block(layer.body, channels, shared)
        self.parts.append(block)
        self.kinds.append("call")
        return block.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, part in zip(self.kinds, self.parts):
            if kind == "residual":
                x = x + part(x)
            elif kind == "concat":
                x = torch.cat([part[0](x), part[1](x)], 1)
            elif kind.startswith("fn:"):
                x = _call_activation(kind[3:], x)
            else:
                x = part(x)
        return x


class Root(nn.Module):
    def __init__(self, spec: Net) -> None:
        super().__init__()
        self.shared = getattr(nn, spec.shared)()
        self.body = Block(spec.body, INPUT_SHAPE[1], self.shared)
        self.outputs = spec.outputs

    def forward(self, x: torch.Tensor) -> object:
        y = self.body(x)
        if self.outputs == "tuple":
            return y, y.sum(1, keepdim=True)
        if self.outputs == "dict":
            return {"features": y, "pooled": F.adaptive_avg_pool2d(y, 1)}
        return y


def _conv_parts(
    spec: Conv, channels: int, shared: nn.Module
) -> tuple[nn.Module, nn.Module | None, nn.Module | None, str | None]:
    padding = spec.dilation * (spec.k // 2) if spec.same else 0
    conv = nn.Conv2d(
        channels, spec.out, spec.k, spec.stride, padding, spec.dilation, groups=spec.groups, bias=spec.bias
    )
    norm = nn.BatchNorm2d(spec.out) if spec.norm else None
    act = fn = None
    if spec.act == SHARED:
        act = shared
    elif spec.act in MODULE_ACTIVATIONS:
        act = getattr(nn, spec.act)()
    elif spec.act is not None:
        fn = spec.act
    return conv, norm, act, fn


def _call_activation(name: str | None, x: torch.Tensor) -> torch.Tensor:
    if name is None:
        return x
    if name in METHOD_ACTIVATIONS:
        return getattr(x, name[1:])()
    return FUNCTION_ACTIVATIONS[name](x)


def build(spec: Net) -> nn.Module:
    """The model that ``spec`` describes, weights seeded (the global RNG is left as it was), in eval mode
    except for the modules ``mode_seed`` picks, with a forward hook on one module when ``hook``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Root(spec).eval()
    if spec.mode_seed is not None:
        chooser = random.Random(spec.mode_seed)
        for module in model.modules():
            if chooser.random() < 0.3:
                module.training = True  # this module only, not its children: mixed flags
    if spec.hook:
        modules = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
        modules[-1].register_forward_hook(_hook)
    return model


def _hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """A hook that changes nothing: its presence is what the property checks."""


# --- the strategy -----------------------------------------------------------------------------------------

# Mostly even widths (GSConv needs them); an odd one now and then, to see BuildError come out clean. Rare,
# as are dilated and unpadded convs: a rule without `where` tests fails on the whole net for any one of them.
WIDTHS = st.sampled_from([2, 4, 6, 8] * 5 + [3])
ACTIVATIONS = st.sampled_from(
    [None, *MODULE_ACTIVATIONS, *FUNCTION_ACTIVATIONS, *METHOD_ACTIVATIONS, SHARED, SHARED]
)


@st.composite
def convs(draw: st.DrawFn, channels: int, size: int, *, out: int | None = None, keep: bool = False) -> Conv:
    """One conv layer from ``channels`` at spatial ``size``; ``keep``: stride 1 and "same" padding."""
    out = draw(WIDTHS) if out is None else out
    common = [g for g in (2, 4) if channels % g == 0 and out % g == 0]
    groups = draw(st.sampled_from([1, 1, 1, *common, *([channels] if channels == out else [])]))
    k = draw(st.sampled_from([1, 3, 3, 5]))
    dilation = draw(st.sampled_from([1] * 19 + [2]))
    # Unpadded convs shrink the map; only where it stays at least 2 wide, so that every net runs.
    same = keep or size - dilation * (k - 1) < 2 or draw(st.sampled_from([True] * 19 + [False]))
    return Conv(
        out=out,
        k=k,
        stride=1 if keep or size < 4 else draw(st.sampled_from([1, 1, 1, 2])),
        groups=groups,
        dilation=dilation,
        bias=draw(st.booleans()),
        norm=draw(st.booleans()),
        act=draw(ACTIVATIONS),
        flat=draw(st.booleans()),
        same=same,
    )


@st.composite
def layers(
    draw: st.DrawFn, channels: int, size: int, depth: int, budget: list[int], *, keep: bool = False
) -> tuple[tuple, int, int]:
    """Layers from ``channels`` at ``size``: ``(layers, channels, size)`` after them. ``keep``: they end with
    ``channels`` and ``size`` (a residual body, a concat branch). ``budget`` holds how many more convs the net
    may have (the convs that restore a width may overdraw it)."""
    start = channels
    body: list = []
    for _ in range(draw(st.integers(1, 2))):
        if budget[0] <= 0:
            break
        kinds = ["conv", "conv", "conv", "twice", "gate", "counter"] + (
            ["residual", "concat", "nest"] * 2 if depth > 0 and budget[0] > 1 else []
        )
        kind = draw(st.sampled_from(kinds))
        if kind in ("conv", "twice"):
            budget[0] -= 1
        if kind == "conv":
            layer = draw(convs(channels, size, keep=keep))
            channels, size = layer.out, _conv_size(layer, size)
        elif kind == "gate":
            layer = Gate()
        elif kind == "counter":
            layer = Counter()
        elif kind == "twice":
            layer = Twice(draw(convs(channels, size, out=channels, keep=True)))
        elif kind == "residual":
            layer = Residual(draw(layers(channels, size, depth - 1, budget, keep=True))[0])
        elif kind == "concat":
            branches = [draw(layers(channels, size, depth - 1, budget, keep=True))[0] for _ in range(2)]
            if 2 * channels > 8 or draw(st.booleans()):  # branches that change width, at most 8 together
                widths = draw(st.sampled_from([(2, 2), (2, 4), (4, 4), (2, 6)]))
                budget[0] -= 2
                branches = [
                    branch + (draw(convs(channels, size, out=width, keep=True)),)
                    for branch, width in zip(branches, widths)
                ]
            layer = Concat(*branches)
            channels = sum(_chain_out(branch, channels) for branch in branches)
        else:
            layer = Nest(draw(layers(channels, size, depth - 1, budget, keep=keep))[0])
            channels, size = _chain_out(layer.body, channels), _chain_size(layer.body, size)
        body.append(layer)
    if keep and channels != start:
        budget[0] -= 1
        body.append(draw(convs(channels, size, out=start, keep=True)))
    return tuple(body), _chain_out(tuple(body), start), size


@st.composite
def nets(draw: st.DrawFn) -> Net:
    """A whole random network (see the module docstring): a stem conv, then up to ``MAX_CONVS`` more."""
    stem = draw(convs(INPUT_SHAPE[1], INPUT_SHAPE[2]))
    body, _, _ = draw(layers(stem.out, _conv_size(stem, INPUT_SHAPE[2]), 2, [MAX_CONVS]))
    return Net(
        (stem, *body),
        outputs=draw(st.sampled_from(["tensor", "tuple", "dict"])),
        shared=draw(st.sampled_from(["ReLU", "SiLU"])),
        mode_seed=draw(st.none() | st.integers(0, 3)),
        hook=draw(st.booleans()),
    )


def _conv_size(conv: Conv, size: int) -> int:
    padding = conv.dilation * (conv.k // 2) if conv.same else 0
    return (size + 2 * padding - conv.dilation * (conv.k - 1) - 1) // conv.stride + 1


def _out_channels(layer: object, channels: int) -> int:
    if isinstance(layer, Conv):
        return layer.out
    if isinstance(layer, (Twice, Residual, Gate, Counter)):
        return channels
    if isinstance(layer, Concat):
        return _chain_out(layer.left, channels) + _chain_out(layer.right, channels)
    return _chain_out(layer.body, channels)


def _chain_out(body: tuple, channels: int) -> int:
    for layer in body:
        channels = _out_channels(layer, channels)
    return channels


def _chain_size(body: tuple, size: int) -> int:
    for layer in body:
        if isinstance(layer, Conv):
            size = _conv_size(layer, size)
        elif isinstance(layer, Nest):
            size = _chain_size(layer.body, size)
    return size
