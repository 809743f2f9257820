"""The passes that drop what eval mode makes a no-op, and fold BatchNorms into the convs before them."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from rewrite.fold.nodes import (
    called_module,
    has_role_at,
    is_foldable_batch_norm,
    is_plain_conv,
    reads_one_value,
    set_called_module,
)
from rewrite.vocabulary import Role

__all__ = ["drop_no_ops", "fold_batch_norms"]


def drop_no_ops(gm: fx.GraphModule) -> bool:
    """Drop every call of a module that returns its input in eval mode (``Identity``, ``Dropout``)."""
    dropped = [node for node in gm.graph.nodes if has_role_at(Role.NO_OP, gm, node) and reads_one_value(node)]
    for node in dropped:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    return bool(dropped)


def fold_batch_norms(gm: fx.GraphModule) -> bool:
    """Fold every eval-mode BatchNorm whose input is a conv that nothing else reads into that conv."""
    folded = False
    for bn in list(gm.graph.nodes):  # in order: a BatchNorm after a folded one reads the conv next
        if is_foldable_batch_norm(gm, bn) and is_plain_conv(gm, bn.args[0]) and len(bn.args[0].users) == 1:
            conv = bn.args[0]
            set_called_module(gm, conv, _conv_with_batch_norm(called_module(gm, conv), called_module(gm, bn)))
            bn.replace_all_uses_with(conv)
            gm.graph.erase_node(bn)
            folded = True
    return folded


def _conv_with_batch_norm(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """torch's :func:`~torch.nn.utils.fusion.fuse_conv_bn_weights` in float64, so that folding adds no rounding of
    its own beyond the final cast."""
    fused = copy.deepcopy(conv)
    double = [
        None if t is None else t.detach().double() for t in (conv.weight, conv.bias, bn.weight, bn.bias)
    ]
    weight, bias, scale, shift = double
    with torch.no_grad():
        weight, bias = fuse_conv_bn_weights(
            weight, bias, bn.running_mean.double(), bn.running_var.double(), bn.eps, scale, shift
        )
    trainable = conv.weight.requires_grad
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=trainable)
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=trainable)
    return fused
