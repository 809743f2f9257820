"""What the fold passes ask of a node, and how they edit a graph module: shared by every pass."""

from __future__ import annotations

import itertools
from typing import Any

from torch import fx, nn

from rewrite.paths import has_attribute
from rewrite.vocabulary import Role, has_role


def called_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def has_role_at(role: Role, gm: fx.GraphModule, node: Any) -> bool:
    return isinstance(node, fx.Node) and has_role(role, node.op, node.target, called_module(gm, node))


def reads_one_value(node: fx.Node) -> bool:
    return len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs


def is_plain_conv(gm: fx.GraphModule, node: Any) -> bool:
    """A call of a conv module (not a transposed one)."""
    return (
        has_role_at(Role.CONV, gm, node)
        and node.op == "call_module"
        and not called_module(gm, node).transposed
    )


def is_foldable_batch_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An eval-mode BatchNorm with running statistics, called on one tensor, that computes only the norm (a
    subclass with a forward of its own, such as timm's ``BatchNormAct2d``, computes more)."""
    if not has_role_at(Role.BATCH_NORM, gm, node) or not reads_one_value(node):
        return False
    bn = called_module(gm, node)
    return not bn.training and bn.running_mean is not None and type(bn).forward is nn.BatchNorm2d.forward


def set_called_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> None:
    """``node`` calls ``module``: in place of the module it called, or under a new name where other nodes call or
    read that one."""
    target, uses = node.target, ("call_module", "get_attr")
    if any(
        n is not node and n.op in uses and f"{n.target}.".startswith(f"{target}.") for n in gm.graph.nodes
    ):
        node.target = free_name(gm, target)
    gm.add_submodule(node.target, module)


def free_name(gm: nn.Module, base: str) -> str:
    """``base``, else the first of ``base_1``, ``base_2``, … that ``gm`` has no attribute under."""
    numbered = (f"{base}_{number}" for number in itertools.count(1))
    return next(name for name in itertools.chain([base], numbered) if not has_attribute(gm, name))


def erase_if_unused(node: fx.Node) -> None:
    if not node.users:
        node.graph.erase_node(node)
