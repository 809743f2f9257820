"""Fold a model for inference: the same outputs from a leaner graph.

:func:`fold` returns an eval-mode copy in which

* every ``BatchNorm`` that follows a convolution (whose output nothing else reads) is folded into that conv's
  weights and bias;
* every fixed permutation of channels (a GSConv channel shuffle: strided slices and a concatenation, an
  unflatten-transpose-flatten, an ``index_select``, …) is gone from the graph. The permutation travels with
  the values: through channel-wise ops (activations, pooling, upsampling, a BatchNorm whose parameters are
  permuted to match), through concatenations (each input keeps its own permutation, in its slice of the
  output), into the input side of the convolutions that consume it (their weights are permuted instead), and,
  where two values meet in an elementwise sum, into the output side of the convolution that produces the other
  operand. Where no consumer can take it (a model output, a reshape, an opaque module), it is applied once, as
  an ``index_select``, so the result stays exact;
* ``Identity`` and ``Dropout`` modules are dropped.

Nothing here knows a particular model: permutations are recognised by what a chain of pure data-movement ops
does to a probe tensor whose entries are all different, so any spelling of a channel shuffle is found.

The model is traced with :func:`rewrite.tracer.trace`. Each traced region is rebuilt as an ``fx.GraphModule`` and
put in place of the module it was traced from, with that module's plain attributes and hooks (the root region's
graph is the result); a region where nothing folds is left as it was. What the tracer kept opaque (a module whose
own ``forward`` cannot be traced) runs as before, and the modules it calls are folded as regions of their own.

>>> import torch
>>> from torch import nn
>>> from rewrite.blocks import GSConv
>>> model = nn.Sequential(GSConv(8, 16), nn.Conv2d(16, 4, 1)).eval()
>>> x = torch.randn(2, 8, 12, 12)
>>> folded = fold(model, x)
>>> torch.allclose(folded(x), model(x), rtol=1e-5, atol=1e-6)
True
>>> [node.target.__name__ for node in folded.graph.nodes if node.op == "call_function"]  # no shuffle left
['cat']
>>> sorted(type(m).__name__ for m in folded.modules() if not list(m.children()))  # nor any BatchNorm
['Conv2d', 'Conv2d', 'DepthwiseConv2d', 'SiLU', 'SiLU']
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from rewrite.facts import TENSOR_META_KEY, shapes
from rewrite.rewriter import carry_hooks, carry_plain_attributes
from rewrite.tracer import Region, trace

__all__ = ["fold"]

# A permutation ``p`` of the channels (dim 1) held by a value: the value the model means, ``T``, is
# ``T[:, c] = V[:, p[c]]`` for the tensor ``V`` that the folded graph computes. ``None`` is the identity.
Perm = tuple[int, ...] | None

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DROPPED = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

# Modules and functions that treat every channel alike: a permutation of the channels passes through them.
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.GELU,
    nn.ELU, nn.Mish, nn.Hardtanh, nn.Softplus,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)  # fmt: skip
_CHANNELWISE_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.mish, F.interpolate, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    operator.neg,
}  # fmt: skip
_CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "neg", "contiguous", "clone"}
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div
}  # fmt: skip
_ELEMENTWISE_METHODS = {"add", "sub", "mul", "div"}
_CATS = {torch.cat, torch.concat}

# Ops that only move data; a chain of them from one tensor to one of the same shape may be a permutation.
_MOVEMENT_FUNCTIONS = {
    operator.getitem, torch.cat, torch.concat, torch.stack, torch.index_select, torch.transpose, torch.permute,
    torch.flatten, torch.unflatten, torch.reshape, torch.narrow, torch.chunk, torch.split,
}  # fmt: skip
_MOVEMENT_METHODS = {
    "view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous", "index_select", "narrow",
    "chunk", "split",
}  # fmt: skip
# Size arithmetic a shuffle may do on its input's shape (``b, c, h, w = x.size()``) is recomputed on the probe.
_SIZE_METHODS = {"size", "dim"}
_SIZE_FUNCTIONS = {operator.mul, operator.floordiv, operator.add, operator.sub, operator.getitem, getattr}


def fold(model: nn.Module, example_inputs: Any) -> nn.Module:
    """An inference-only copy of ``model`` with BatchNorms, channel shuffles and identities folded away.

    ``example_inputs`` is what the model's forward takes (a tensor, or a tuple of positional arguments); the
    copy computes the same function for inputs of that structure (as :func:`~rewrite.tracer.trace` fixes
    non-tensor arguments). ``model`` itself is never touched, and folding a folded model changes nothing.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Identity(), nn.ReLU())
    >>> folded = fold(model, torch.randn(1, 3, 8, 8))
    >>> [node.target for node in folded.graph.nodes]
    ['input', '0', '3', 'output']
    >>> model.training   # untouched
    True
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    result = copy.deepcopy(model).eval()
    traced = trace(result, inputs)
    # Deepest first, so that a region's new graph module is in place before anything above it is rebuilt.
    for region in sorted(traced.regions, key=lambda r: r.path.count(".") + bool(r.path), reverse=True):
        folded = _fold_region(region)
        if folded is None:
            continue
        replaced = result.get_submodule(region.path)
        carry_plain_attributes(replaced, folded)
        carry_hooks(replaced, folded)
        if not region.path:
            result = folded
        else:
            parent, _, name = region.path.rpartition(".")
            setattr(result.get_submodule(parent), name, folded)
    return result


# Finding permutations


@dataclass(frozen=True)
class _Shuffle:
    """``output`` is ``source`` with its channels permuted: ``T_output[:, c] = T_source[:, order[c]]``."""

    source: fx.Node
    output: fx.Node
    order: tuple[int, ...]
    inside: frozenset[fx.Node]  # the chain's nodes, output included


def _find_shuffles(gm: fx.GraphModule) -> dict[fx.Node, _Shuffle]:
    found: dict[fx.Node, _Shuffle] = {}
    for node in gm.graph.nodes:
        if _is_movement(node) and _shape(node) is not None and len(_shape(node)) >= 2:
            shuffle = _shuffle_ending_at(gm, node)
            if shuffle is not None:
                found[node] = shuffle
    return found


def _shuffle_ending_at(gm: fx.GraphModule, output: fx.Node) -> _Shuffle | None:
    """The channel permutation that a chain of data-movement ops ending at ``output`` is, if it is one."""
    shape = _shape(output)
    # Walk back through movement and size ops; the nearest node of the output's shape outside them is the source.
    chain: list[fx.Node] = []
    frontier, seen = [output], {output}
    while frontier:
        node = frontier.pop()
        chain.append(node)
        for source in node.all_input_nodes:
            if source in seen:
                continue
            seen.add(source)
            if _is_movement(source) and _shape(source) != shape or _is_size_op(source):
                frontier.append(source)
    position = _order_key(gm)
    for source in sorted(seen - set(chain), key=position, reverse=True):
        if _shape(source) != shape:
            continue
        inside = _nodes_between(source, output, set(chain), position)
        if inside is None:
            continue
        order = _probe(gm, source, output, inside, shape)
        if order is not None and order != tuple(range(shape[1])):
            return _Shuffle(source, output, order, frozenset(inside))
    return None


def _nodes_between(
    source: fx.Node, output: fx.Node, chain: set[fx.Node], position: Callable[[fx.Node], int]
) -> list[fx.Node] | None:
    """The chain's nodes that ``output`` needs, when ``source`` is the only thing from outside they read."""
    needed, stack = {output}, [output]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg is source or arg in needed:
                continue
            if arg.op == "get_attr":  # a constant, e.g. the indices of an index_select
                needed.add(arg)
                continue
            if arg not in chain:
                return None
            needed.add(arg)
            stack.append(arg)
    return sorted(needed, key=position)


def _probe(
    gm: fx.GraphModule, source: fx.Node, output: fx.Node, inside: list[fx.Node], shape: tuple[int, ...]
) -> tuple[int, ...] | None:
    """Run the chain on a tensor of all-different integers; a channel permutation gathers whole channels."""
    probe = torch.arange(_numel(shape), dtype=torch.int64).reshape(shape)
    env: dict[fx.Node, Any] = {source: probe}
    try:
        for node in inside:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            if node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "get_attr":
                env[node] = _attribute(gm, node.target)
            else:
                env[node] = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - not a permutation we can prove: the chain stays as it is
        return None
    result = env[output]
    if not isinstance(result, Tensor) or tuple(result.shape) != shape:
        return None
    if not shape[0]:
        return None
    # Entry (b, c, ...) of the probe is b*C*R + c*R + r: channel c of the output came from channel value // R.
    order = (result[0].reshape(shape[1], -1)[:, 0] // _numel(shape[2:])).tolist()
    if sorted(order) != list(range(shape[1])):
        return None
    if not torch.equal(result, probe.index_select(1, torch.tensor(order))):
        return None
    return tuple(order)


# Rebuilding a region


class _Builder:
    """Copies a region's graph node by node, folding as it goes; see the module docstring."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = fx.Graph()
        # A forward taking or returning containers (a dict of images, a named tuple) was traced with fx's pytree
        # codegen, which flattens them on the way in and rebuilds them on the way out; the new graph must keep
        # that calling convention. fx copies a graph's codegen the same way (Graph.__deepcopy__).
        self.graph.set_codegen(copy.deepcopy(gm.graph._codegen))
        self.attributes: dict[str, Any] = {}  # what the new graph module holds, by target
        self.env: dict[fx.Node, tuple[Any, Perm]] = {}  # old node -> (new node or constant, its permutation)
        self.origin: dict[fx.Node, list[fx.Node]] = {}  # new node -> the old nodes whose value it is
        self.applied: dict[tuple[fx.Node, Perm], fx.Node] = {}
        self.changed = False
        # Where the region's weights live: an applied channel order must be there too.
        self.device = next(iter([*gm.parameters(), *gm.buffers()]), torch.empty(0)).device

    def build(self) -> fx.GraphModule | None:
        shuffles = _find_shuffles(self.gm)
        skipped = _only_used_by_shuffles(shuffles)
        self.changed = bool(shuffles)
        for node in self.gm.graph.nodes:
            if node in skipped:
                continue
            if node in shuffles:
                shuffle = shuffles[node]
                value, perm = self.env[shuffle.source]
                self.set(node, value, _compose(perm, shuffle.order))
            else:
                self.copy(node)
        if not self.changed:
            return None
        graph_module = fx.GraphModule(self.attributes, self.graph, class_name=type(self.gm).__name__)
        graph_module.graph.eliminate_dead_code()  # chains a shuffle made unneeded, folded BatchNorms
        graph_module.delete_all_unused_submodules()
        graph_module.recompile()
        return graph_module

    def set(self, old: fx.Node, value: Any, perm: Perm) -> None:
        self.env[old] = (value, perm)
        if isinstance(value, fx.Node):
            self.origin.setdefault(value, []).append(old)

    # One node

    def copy(self, node: fx.Node) -> None:
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            if isinstance(module, _DROPPED) and len(node.args) == 1 and not node.kwargs:
                self.changed = True
                self.set(node, *self.env[node.args[0]])
                return
            if isinstance(module, _CONVS) and self.conv(node, module):
                return
            if isinstance(module, _BATCH_NORMS) and self.batch_norm(node, module):
                return
            if isinstance(module, _CHANNELWISE_MODULES) and self.channelwise(node):
                return
        elif node.op == "call_function":
            if node.target in _CHANNELWISE_FUNCTIONS and self.channelwise(node):
                return
            if node.target in _ELEMENTWISE_FUNCTIONS and self.elementwise(node):
                return
            if node.target in _CATS and self.cat(node):
                return
        elif node.op == "call_method":
            if node.target in _CHANNELWISE_METHODS and self.channelwise(node):
                return
            if node.target in _ELEMENTWISE_METHODS and self.elementwise(node):
                return
        self.emit(node, self.applied_value)

    def emit(self, node: fx.Node, value_of: Callable[[fx.Node], Any], target: str | None = None) -> fx.Node:
        """Copy ``node`` into the new graph, its arguments given by ``value_of``; its result is unpermuted."""
        if node.op == "get_attr":
            self.attributes[node.target] = _attribute(self.gm, node.target)
        new = self.graph.node_copy(node, value_of)
        if node.op == "call_module":
            new.target = target or self.own_module(node.target, self.gm.get_submodule(node.target))
        new.meta = {key: value for key, value in node.meta.items() if key == TENSOR_META_KEY}
        self.set(node, new, None)
        return new

    def own_module(self, target: str, module: nn.Module) -> str:
        """``target`` for ``module`` in the new graph module; a module called twice gets a copy the second time."""
        name, number = target, 0
        while name in self.attributes and self.attributes[name] is not module:
            number += 1
            name = f"{target}_{number}"
        self.attributes[name] = module
        return name

    def fresh_module(self, target: str, module: nn.Module) -> str:
        """Put a new ``module`` (made by folding) in the new graph module, under ``target`` if that is free."""
        name, number = target, 0
        while name in self.attributes:
            number += 1
            name = f"{target}_{number}"
        self.attributes[name] = module
        return name

    def value(self, arg: Any) -> tuple[Any, Perm]:
        return self.env[arg] if isinstance(arg, fx.Node) else (arg, None)

    def applied_value(self, old: fx.Node) -> Any:
        """The value ``old`` means, with any pending permutation applied (once per value and permutation)."""
        value, perm = self.env[old]
        if perm is None:
            return value
        key = (value, perm)
        if key not in self.applied:
            self.changed = True
            order = torch.tensor(perm, dtype=torch.int64, device=self.device)
            buffer = self.fresh_module("_fold_channel_order", order)
            index = self.graph.get_attr(buffer)
            self.applied[key] = self.graph.call_function(torch.index_select, (value, 1, index))
        return self.applied[key]

    # Rules

    def conv(self, node: fx.Node, module: nn.Module) -> bool:
        if len(node.args) != 1 or node.kwargs or module.transposed:
            return False
        value, perm = self.value(node.args[0])
        if perm is None:
            self.emit(node, self.applied_value)
            return True
        groups = module.groups
        per_group = module.in_channels // groups
        group_of = [perm[c] // per_group for c in range(len(perm))]
        # A grouped conv takes a permutation that moves whole groups and keeps the order inside each one.
        if groups > 1 and (
            any(perm[c] % per_group != c % per_group for c in range(len(perm)))
            or any(group_of[c] != group_of[c - c % per_group] for c in range(len(perm)))
        ):
            return False
        new = copy.deepcopy(module)
        with torch.no_grad():
            if groups == 1:
                new.weight.copy_(module.weight[:, list(_inverse(perm))])
                out_perm = None
            else:
                old_group = _inverse(tuple(group_of[g * per_group] for g in range(groups)))
                out_per_group = module.out_channels // groups
                rows = [old_group[g] * out_per_group + m for g in range(groups) for m in range(out_per_group)]
                new.weight.copy_(module.weight[rows])
                if module.bias is not None:
                    new.bias.copy_(module.bias[rows])
                out_perm = tuple(
                    group_of[g * per_group] * out_per_group + m
                    for g in range(groups)
                    for m in range(out_per_group)
                )
        self.changed = True
        target = self.fresh_module(node.target, new)
        new_node = self.emit(node, lambda _: value, target)
        self.set(node, new_node, out_perm)
        return True

    def batch_norm(self, node: fx.Node, module: nn.Module) -> bool:
        if module.training or module.running_mean is None or len(node.args) != 1 or node.kwargs:
            return False
        value, perm = self.value(node.args[0])
        conv = self.producing_conv(node.args[0], value)
        if conv is not None:
            fused = _fold_batch_norm(self.attributes[conv.target], module, perm)
            self.attributes[conv.target] = fused
            self.changed = True
            self.set(node, value, perm)
            return True
        if perm is None:
            self.emit(node, self.applied_value)
            return True
        new = copy.deepcopy(module)
        order = list(_inverse(perm))
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(new, name)
            if tensor is not None:
                with torch.no_grad():
                    tensor.copy_(getattr(module, name)[order])
        target = self.fresh_module(node.target, new)
        self.set(node, self.emit(node, lambda _: value, target), perm)
        return True

    def producing_conv(self, old: fx.Node, value: Any) -> fx.Node | None:
        """The new conv node that computes ``value``, when nothing but the BatchNorm at hand reads it."""
        if not (isinstance(value, fx.Node) and value.op == "call_module" and not value.users):
            return None
        if len(old.users) != 1 or any(len(o.users) != 1 for o in self.origin.get(value, [])):
            return None
        module = self.attributes[value.target]
        return value if isinstance(module, _CONVS) and not module.transposed and self.owns(value) else None

    def channelwise(self, node: fx.Node) -> bool:
        """Ops whose first argument is the only tensor: the permutation passes through."""
        rest = pytree.tree_leaves((node.args[1:], node.kwargs))
        if (
            not node.args
            or not isinstance(node.args[0], fx.Node)
            or any(isinstance(a, fx.Node) for a in rest)
        ):
            return False
        perm = self.env[node.args[0]][1]
        if perm is None or _shape(node) is None or len(_shape(node)) < 2 or _shape(node)[1] != len(perm):
            return False
        self.set(node, self.emit(node, lambda n: self.env[n][0]), perm)
        return True

    def elementwise(self, node: fx.Node) -> bool:
        """A sum or product: operands that vary over channels must hold the same permutation."""
        out = _shape(node)
        if out is None or len(out) < 2 or len(node.args) != 2:
            return False
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        full = []
        for operand in operands:
            shape = _shape(operand)
            if shape is None:
                return False
            channel = len(shape) - len(out) + 1
            if channel < 0 or shape[channel] == 1:
                if self.env[operand][1] is not None:
                    return False
                continue
            if len(shape) != len(out):
                return False
            full.append(operand)
        perms = {self.env[o][1] for o in full} - {None}
        if len(perms) != 1:
            return False
        (perm,) = perms
        for operand in full:
            if self.env[operand][1] is None and not self.permute_producer(operand, perm):
                return False
        self.set(node, self.emit(node, lambda n: self.env[n][0]), perm)
        return True

    def permute_producer(self, old: fx.Node, perm: tuple[int, ...]) -> bool:
        """Make the conv behind ``old`` (through channel-wise ops nothing else reads yet) emit ``perm``'s order."""
        node, chain = self.env[old][0], []
        # From the operand up to its conv: the operand has no reader yet, each node above it one (the next).
        while True:
            if not isinstance(node, fx.Node) or len(node.users) != (1 if chain else 0):
                return False
            if any(self.env[o][1] is not None for o in self.origin.get(node, [])):
                return False
            chain.append(node)
            if node.op == "call_module" and isinstance(self.attributes[node.target], _CONVS):
                break
            if not _is_channelwise_new(self, node):
                return False
            node = node.args[0]
        module = self.attributes[node.target]
        if module.groups != 1 or module.transposed or not self.owns(node):
            return False
        new = copy.deepcopy(module)
        order = list(_inverse(perm))
        with torch.no_grad():
            new.weight.copy_(module.weight[order])
            if module.bias is not None:
                new.bias.copy_(module.bias[order])
        self.attributes[node.target] = new
        self.changed = True
        for new_node in chain:
            for old_node in self.origin.get(new_node, []):
                self.env[old_node] = (new_node, perm)
        return True

    def owns(self, node: fx.Node) -> bool:
        """Whether ``node`` is the only call of its module in the new graph (so its weights may change)."""
        return sum(1 for n in self.graph.nodes if n.op == "call_module" and n.target == node.target) == 1

    def cat(self, node: fx.Node) -> bool:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = _shape(node)
        if out is None or not isinstance(tensors, (list, tuple)) or dim not in (1, 1 - len(out)):
            return False
        values = [self.value(t) for t in tensors]
        if all(perm is None for _, perm in values):
            return False
        order: list[int] = []
        offset = 0
        for tensor, (_, perm) in zip(tensors, values, strict=True):
            shape = _shape(tensor) if isinstance(tensor, fx.Node) else None
            if shape is None:
                return False
            order += [offset + c for c in (perm or range(shape[1]))]
            offset += shape[1]
        self.set(node, self.emit(node, lambda n: self.env[n][0]), tuple(order))
        return True


def _is_channelwise_new(builder: _Builder, node: Any) -> bool:
    """Whether a node of the new graph is a one-input channel-wise op."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(builder.attributes[node.target], _CHANNELWISE_MODULES) and len(node.args) == 1
    rest = pytree.tree_leaves((node.args[1:], node.kwargs))
    if any(isinstance(a, fx.Node) for a in rest):
        return False
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _CHANNELWISE_METHODS


def _fold_region(region: Region) -> fx.GraphModule | None:
    return _Builder(region.graph_module).build()


def _only_used_by_shuffles(shuffles: dict[fx.Node, _Shuffle]) -> set[fx.Node]:
    """Nodes inside shuffles whose value nothing else needs: they are not copied at all."""
    skipped: set[fx.Node] = set()
    for shuffle in shuffles.values():
        for node in shuffle.inside:
            if node is not shuffle.output and all(user in shuffle.inside for user in node.users):
                skipped.add(node)
    return skipped


def _fold_batch_norm(conv: nn.Module, bn: nn.Module, perm: Perm) -> nn.Module:
    """``conv`` followed by ``bn`` as one conv; ``perm`` is the order of the conv's output channels."""
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        # In float64, so that folding adds no rounding of its own beyond the final cast.
        scale = bn.weight.double() if bn.weight is not None else torch.ones_like(bn.running_var.double())
        shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
        scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = shift - bn.running_mean.double() * scale
        if perm is not None:  # BN channel c is conv output channel perm[c]
            order = list(_inverse(perm))
            scale, shift = scale[order], shift[order]
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        weight = conv.weight.double() * scale.reshape(-1, *(1,) * (conv.weight.dim() - 1))
        fused.weight.copy_(weight.to(conv.weight.dtype))
        fused.bias = nn.Parameter(
            (bias * scale + shift).to(conv.weight.dtype), requires_grad=conv.weight.requires_grad
        )
    return fused


# Small helpers


def _compose(perm: Perm, order: tuple[int, ...]) -> Perm:
    """The permutation of a shuffle's output, given its source's: ``T_out[:, c] = V[:, perm[order[c]]]``."""
    composed = tuple(order[c] if perm is None else perm[order[c]] for c in range(len(order)))
    return None if composed == tuple(range(len(composed))) else composed


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(perm)
    for c, p in enumerate(perm):
        inverse[p] = c
    return tuple(inverse)


def _shape(node: Any) -> tuple[int, ...] | None:
    found = shapes(node) if isinstance(node, fx.Node) else ()
    return found[0] if len(found) == 1 else None


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _is_movement(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MOVEMENT_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MOVEMENT_METHODS
    )


def _is_size_op(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SIZE_METHODS
    return node.op == "call_function" and node.target in _SIZE_FUNCTIONS and _shape(node) is None


def _order_key(gm: fx.GraphModule) -> Callable[[fx.Node], int]:
    positions = {node: index for index, node in enumerate(gm.graph.nodes)}
    return lambda node: positions[node]


def _attribute(gm: nn.Module, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value
