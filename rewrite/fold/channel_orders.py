"""Channel permutations folded into weights: the GSConv shuffle (or any other fixed reordering of channels) gone.

:func:`fold_channel_orders` finds every chain of pure data-movement ops that permutes the channels (by running it
on a probe tensor whose entries all differ, so any spelling of a shuffle is found), writes it as one
:func:`channel_order` node, and moves each order into the ops after it: through channel-wise ops, BatchNorms,
concatenations and elementwise ops with like-ordered operands, into the input weights of a conv, or into the
producer of an elementwise sum's other operand. :func:`lower_channel_orders` writes what is left as one
``index_select`` each.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from rewrite.facts import shapes
from rewrite.fold.nodes import (
    called_module,
    erase_if_unused,
    free_name,
    has_role_at,
    is_foldable_batch_norm,
    is_plain_conv,
    reads_one_value,
    set_called_module,
)
from rewrite.paths import attribute_at
from rewrite.vocabulary import Role, has_role

__all__ = ["Order", "channel_order", "fold_channel_orders", "lower_channel_orders"]

# A permutation of the channels (dim 1): ``T[:, c] = V[:, order[c]]``.
Order = tuple[int, ...]


# Finding shuffles
# Channel orders: finding shuffles


def channel_order(x: Tensor, order: Order) -> Tensor:
    """``x`` with its channels (dim 1) in ``order``: how :func:`fold_channel_orders` writes a permutation."""
    return x.index_select(1, torch.tensor(order, device=x.device))


@dataclass(frozen=True)
class _Shuffle:
    """``output`` is ``source`` with its channels permuted: ``T_output[:, c] = T_source[:, order[c]]``."""

    source: fx.Node
    output: fx.Node
    order: Order
    inside: frozenset[fx.Node]  # the chain's nodes, output included


def _find_shuffles(gm: fx.GraphModule) -> list[_Shuffle]:
    ends = [node for node in gm.graph.nodes if _is_movement(node) and len(_shape(node) or ()) >= 2]
    return [shuffle for shuffle in (_shuffle_ending_at(gm, end) for end in ends) if shuffle is not None]


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
    for source in sorted(seen - set(chain), reverse=True):
        if _shape(source) != shape:
            continue
        inside = _nodes_between(source, output, set(chain))
        if inside is None:
            continue
        order = _probe(gm, source, output, inside, shape)
        if order is not None and order != tuple(range(shape[1])):
            return _Shuffle(source, output, order, frozenset(inside))
    return None


def _nodes_between(source: fx.Node, output: fx.Node, chain: set[fx.Node]) -> list[fx.Node] | None:
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
    return sorted(needed)


def _probe(
    gm: fx.GraphModule, source: fx.Node, output: fx.Node, inside: list[fx.Node], shape: tuple[int, ...]
) -> Order | None:
    """Run the chain on a tensor of all-different integers; a channel permutation gathers whole channels."""
    probe = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    env: dict[fx.Node, Any] = {source: probe}
    try:
        for node in inside:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            if node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "get_attr":
                env[node] = attribute_at(gm, node.target)
            else:
                env[node] = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - not a permutation we can prove: the chain stays as it is
        return None
    result = env[output]
    if not isinstance(result, Tensor) or tuple(result.shape) != shape or not shape[0]:
        return None
    # Entry (b, c, ...) of the probe is b*C*R + c*R + r: channel c of the output came from channel value // R.
    order = (result[0].reshape(shape[1], -1)[:, 0] // math.prod(shape[2:])).tolist()
    if sorted(order) != list(range(shape[1])):
        return None
    if not torch.equal(result, probe.index_select(1, torch.tensor(order))):
        return None
    return tuple(order)


# Moving them into the ops after them


def fold_channel_orders(gm: fx.GraphModule) -> bool:
    """Write every channel shuffle as one :func:`channel_order` node, then move each into the ops after it.

    A channel-wise op, a BatchNorm (its parameters permuted), a concatenation on dim 1 and an elementwise op
    whose operands hold the same order compute on the unpermuted values and pass the order on; a conv takes it
    into its input weights (a grouped conv when it moves whole groups, passing a group order on). An order that
    no reader takes stays where it is, for :func:`lower_channel_orders`.
    """
    shuffles = _find_shuffles(gm)
    written: dict[fx.Node, fx.Node] = {}  # a shuffle's output -> its channel_order node
    for shuffle in shuffles:
        source = written.get(shuffle.source, shuffle.source)
        with gm.graph.inserting_after(shuffle.output):
            written[shuffle.output] = gm.graph.call_function(channel_order, (source, shuffle.order))
        shuffle.output.replace_all_uses_with(written[shuffle.output])
    # What only the shuffles read goes (last first, so that a node's readers go before it).
    for node in sorted(
        {*written.values(), *(n for shuffle in shuffles for n in shuffle.inside)}, reverse=True
    ):
        erase_if_unused(node)
    for node in list(gm.graph.nodes):
        if any(_is_order(arg) for arg in node.all_input_nodes):
            for take in _RULES:
                if take(gm, node):
                    break
    return bool(shuffles)


def _compose(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An order of an order: one order of the first's source (none when they cancel)."""
    if not (_is_order(node) and _is_order(node.args[0])):
        return False
    inner = node.args[0]
    source, first = inner.args
    order = tuple(first[c] for c in node.args[1])
    if order == tuple(range(len(order))):
        node.replace_all_uses_with(source)
        erase_if_unused(node)
    else:
        node.args = (source, order)
    erase_if_unused(inner)
    return True


def _into_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A conv reads the unpermuted input, its weights permuted to match."""
    if not is_plain_conv(gm, node) or not reads_one_value(node) or not _is_order(node.args[0]):
        return False
    taken = _conv_reading(called_module(gm, node), node.args[0].args[1])
    if taken is None:
        return False
    new, out_order = taken
    set_called_module(gm, node, new)
    _read_sources(node, [node.args[0]])
    if out_order is not None:
        _order_readers(node, out_order)
    return True


def _conv_reading(conv: nn.Module, order: Order) -> tuple[nn.Module, Order | None] | None:
    """A copy of ``conv`` that computes on its input's unpermuted channels, and the order of its output.

    An ungrouped conv permutes the columns of its weight and its output is in order. A grouped conv takes an
    order that moves whole groups and keeps the order inside each: it permutes its groups' rows and its output
    is in the order of its groups; any other order it cannot take (``None``).
    """
    groups, per_group = conv.groups, conv.in_channels // conv.groups
    group_of = [order[c] // per_group for c in range(len(order))]
    if groups > 1 and (
        any(order[c] % per_group != c % per_group for c in range(len(order)))
        or any(group_of[c] != group_of[c - c % per_group] for c in range(len(order)))
    ):
        return None
    new = copy.deepcopy(conv)
    if groups == 1:
        with torch.no_grad():
            new.weight.copy_(conv.weight[:, list(_inverse(order))])
        return new, None
    out_per_group = conv.out_channels // groups
    old_group = _inverse(tuple(group_of[::per_group]))
    rows = [old_group[g] * out_per_group + m for g in range(groups) for m in range(out_per_group)]
    with torch.no_grad():
        new.weight.copy_(conv.weight[rows])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[rows])
    return new, tuple(g * out_per_group + m for g in group_of[::per_group] for m in range(out_per_group))


def _through_batch_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A BatchNorm with its per-channel parameters and statistics permuted to match."""
    if not is_foldable_batch_norm(gm, node) or not _is_order(node.args[0]):
        return False
    module, order = called_module(gm, node), node.args[0].args[1]
    new = copy.deepcopy(module)
    rows = list(_inverse(order))
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(new, name) is not None:
                getattr(new, name).copy_(getattr(module, name)[rows])
    set_called_module(gm, node, new)
    _read_sources(node, [node.args[0]])
    _order_readers(node, order)
    return True


def _through_channelwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op whose first argument is its only tensor and that treats every channel alike."""
    if not has_role_at(Role.CHANNELWISE, gm, node) or not node.args or not _is_order(node.args[0]):
        return False
    if any(isinstance(a, fx.Node) for a in pytree.tree_leaves((node.args[1:], node.kwargs))):
        return False
    order, shape = node.args[0].args[1], _shape(node)
    if shape is None or len(shape) < 2 or shape[1] != len(order):
        return False
    _read_sources(node, [node.args[0]])
    _order_readers(node, order)
    return True


def _through_concatenation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A concatenation on dim 1: each input's order, in its slice of the output."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = _shape(node)
    if not has_role_at(Role.CONCATENATION, gm, node) or out is None or not isinstance(tensors, (list, tuple)):
        return False
    if dim not in (1, 1 - len(out)) or not all(_shape(t) is not None for t in tensors):
        return False
    if not any(_is_order(t) for t in tensors):
        return False
    order: list[int] = []
    for tensor in tensors:
        channels = _shape(tensor)[1]
        order += [len(order) + c for c in (tensor.args[1] if _is_order(tensor) else range(channels))]
    _read_sources(node, [t for t in tensors if _is_order(t)])
    _order_readers(node, tuple(order))
    return True


def _through_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A sum or product: the operands that vary over channels hold the same order, or one of them comes from a
    conv (through channel-wise ops) whose output rows can be put in that order."""
    out = _shape(node)
    if not has_role_at(Role.ELEMENTWISE, gm, node) or out is None or len(out) < 2 or len(node.args) != 2:
        return False
    full = []
    for operand in (a for a in node.args if isinstance(a, fx.Node)):
        shape = _shape(operand)
        if shape is None:
            return False
        channel = len(shape) - len(out) + 1
        if channel < 0 or shape[channel] == 1:  # the same for every channel: it must not be permuted
            if _is_order(operand):
                return False
        elif len(shape) != len(out):
            return False
        else:
            full.append(operand)
    orders = {operand.args[1] for operand in full if _is_order(operand)}
    if len(orders) != 1:
        return False
    (order,) = orders
    chains = [_producer_chain(gm, operand, node) for operand in full if not _is_order(operand)]
    if None in chains:
        return False
    for chain in chains:
        _put_producer_in_order(gm, chain, order, node)
    _read_sources(node, [operand for operand in full if _is_order(operand)])
    _order_readers(node, order)
    return True


def _producer_chain(gm: fx.GraphModule, operand: fx.Node, reader: fx.Node) -> list[fx.Node] | None:
    """From ``operand`` up to the ungrouped conv computing it through one-input channel-wise ops, when nothing
    before ``reader`` reads any of them but the next of them (so the conv's output rows may be reordered)."""
    chain: list[fx.Node] = []
    node = operand
    while isinstance(node, fx.Node):
        next_link = chain[-1] if chain else reader
        if any(user < reader and user is not next_link for user in node.users):
            return None
        chain.append(node)
        if is_plain_conv(gm, node):
            return chain if called_module(gm, node).groups == 1 else None
        if not _is_channelwise_on_one_tensor(gm, node):
            return None
        node = node.args[0]
    return None


def _put_producer_in_order(gm: fx.GraphModule, chain: list[fx.Node], order: Order, reader: fx.Node) -> None:
    """Permute the output rows of the conv ending ``chain``; every other reader of the chain reads the order."""
    conv = chain[-1]
    module, rows = called_module(gm, conv), list(_inverse(order))
    new = copy.deepcopy(module)
    with torch.no_grad():
        new.weight.copy_(module.weight[rows])
        if module.bias is not None:
            new.bias.copy_(module.bias[rows])
    set_called_module(gm, conv, new)
    for node, next_link in zip(chain, [reader, *chain], strict=False):
        _order_readers(node, order, keep=next_link)


def _is_channelwise_on_one_tensor(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not has_role_at(Role.CHANNELWISE, gm, node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return len(node.args) == 1
    return not any(isinstance(a, fx.Node) for a in pytree.tree_leaves((node.args[1:], node.kwargs)))


# The rules an op with a permuted input is tried against, in order; the first that applies rewrites it.
_RULES = (
    _compose,
    _into_conv,
    _through_batch_norm,
    _through_channelwise,
    _through_elementwise,
    _through_concatenation,
)


def _read_sources(node: fx.Node, orders: Iterable[fx.Node]) -> None:
    """``node`` reads the sources of these channel orders instead (an order nothing reads any more goes)."""
    for order in dict.fromkeys(orders):
        node.replace_input_with(order, order.args[0])
        erase_if_unused(order)


def _order_readers(node: fx.Node, order: Order, keep: fx.Node | None = None) -> None:
    """Every reader of ``node`` but ``keep`` reads ``node`` in ``order``: one new channel order node."""
    readers = [user for user in node.users if user is not keep]
    if not readers:
        return
    with node.graph.inserting_after(node):
        ordered = node.graph.call_function(channel_order, (node, order))
    for reader in readers:
        reader.replace_input_with(node, ordered)


# Orders left: one index_select each


def lower_channel_orders(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (with only the attributes its graph uses) in which each :func:`channel_order` is an
    ``index_select`` on a buffer of its own (``_fold_channel_order``: what ONNX exports as one Gather), one for
    each value and order."""
    return _ChannelOrderLowering(fx.GraphModule(gm, copy.deepcopy(gm.graph))).transform()


class _ChannelOrderLowering(fx.Transformer):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.lowered: dict[tuple[fx.Node, Order], fx.Proxy] = {}
        # Where the weights live: an index must be there too.
        self.device = next(iter([*gm.parameters(), *gm.buffers()]), torch.empty(0)).device

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if target is not channel_order:
            return super().call_function(target, args, kwargs)
        value, order = args
        if (value.node, order) not in self.lowered:
            name = free_name(self.module, "_fold_channel_order")
            self.module.register_buffer(name, torch.tensor(order, dtype=torch.int64, device=self.device))
            index = self.tracer.create_proxy("get_attr", name, (), {})
            self.lowered[value.node, order] = self.tracer.create_proxy(
                "call_function", torch.index_select, (value, 1, index), {}
            )
        return self.lowered[value.node, order]

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The name the graph calls it by (fx's Transformer would look the module object up among all of them).
        return self.tracer.create_proxy("call_module", target, args, kwargs)


# Small helpers


def _shape(node: object) -> tuple[int, ...] | None:
    """The shape of the one tensor ``node`` gives (the tracer's ``tensor_meta``; a channel order's is its source's)."""
    while _is_order(node):
        node = node.args[0]
    found = shapes(node) if isinstance(node, fx.Node) else ()
    return tuple(found[0]) if len(found) == 1 and found[0] is not None else None


def _is_order(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is channel_order


def _is_movement(node: fx.Node) -> bool:
    return has_role(Role.MOVEMENT, node.op, node.target)


def _is_size_op(node: fx.Node) -> bool:
    return has_role(Role.SIZE, node.op, node.target) and _shape(node) is None


def _inverse(order: Order) -> Order:
    return tuple(sorted(range(len(order)), key=order.__getitem__))
