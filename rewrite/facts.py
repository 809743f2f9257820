"""What the tracer knows about each fx node, as one typed record: :class:`NodeFacts`.

The tracer writes it once, when it creates the node, as ``node.meta["rewrite"]``; the later stages read it with
:func:`facts`. It says where a node comes from: the module calls that enclosed it when it was traced, outermost
first, each a :class:`Frame` (the path it was called through, its class name, which call of that path it was).

What a node *computes* (the shapes and dtypes of its output) is not part of it. The tracer records that when it
runs the region, as fx's own ``node.meta["tensor_meta"]``: what ``torch.fx.passes.shape_prop.ShapeProp``
writes, a :class:`~torch.fx.passes.shape_prop.TensorMetadata` for each tensor in the structure of the output
(the run records no autograd graph, so none ``requires_grad``), read back flattened with :func:`shapes` and
:func:`dtypes`. Two reasons to keep them apart: the tensor facts come from a run that may never happen
(``trace(..., propagate_shapes=False)``), so the record of the trace is written once and never patched; and
fx's format is the one its passes, drawers and other tools already read, which also lets a pass that copies
nodes into a new graph (``rewrite.fold``) keep what the values are without carrying provenance that no longer
holds there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.utils import _pytree as pytree

from rewrite.errors import TraceError

__all__ = [
    "FACTS_KEY",
    "TENSOR_META_KEY",
    "CallId",
    "Frame",
    "NodeFacts",
    "dtypes",
    "facts",
    "record_tensor_meta",
    "shapes",
]

FACTS_KEY = "rewrite"
TENSOR_META_KEY = "tensor_meta"  # torch.fx.passes.shape_prop's key


class CallId(NamedTuple):
    """One call of a module: the path it was called through and which call of that path it is (from 0)."""

    path: str
    index: int

    def __str__(self) -> str:
        return f"{self.path}@{self.index}"


@dataclass(frozen=True, slots=True)
class Frame:
    """One module call on a call stack: which call it is, and the class of the module called."""

    call: CallId
    type_name: str

    @property
    def path(self) -> str:
        """The path the module was called through (see ``rewrite.region.held_path``)."""
        return self.call.path


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """Where a node comes from: the module calls that enclosed it, outermost (the model's own call) first.

    The innermost frame is the node's own module: the module whose call produced it (``""`` for ops written in
    the root's forward), or, for a ``call_module`` node, the called module itself. A path is the one a module
    was *called through*, so it is a valid ``get_submodule`` path of the traced model; a module held under two
    names and called through both has two paths, and a module called twice has two call ids.

    >>> facts = NodeFacts((Frame(CallId("", 0), "Net"), Frame(CallId("conv", 1), "Conv2d")))
    >>> facts.path, facts.type_name, str(facts.call)
    ('conv', 'Conv2d', 'conv@1')
    """

    frames: tuple[Frame, ...]

    @property
    def path(self) -> str:
        """The path of the node's own module."""
        return self.frames[-1].path

    @property
    def type_name(self) -> str:
        """The class name of the node's own module."""
        return self.frames[-1].type_name

    @property
    def call(self) -> CallId:
        """The call of the node's own module that produced the node."""
        return self.frames[-1].call

    @property
    def calls(self) -> tuple[CallId, ...]:
        """The call ids of the frames, outermost first."""
        return tuple(frame.call for frame in self.frames)


def facts(node: fx.Node) -> NodeFacts:
    """The facts the tracer wrote on ``node``; a :class:`~rewrite.errors.TraceError` for a node it never made."""
    try:
        return node.meta[FACTS_KEY]
    except KeyError:
        raise TraceError(
            f"fx node {node.name!r} ({node.op}) carries no rewrite facts: only graphs that rewrite.trace() made"
            " have them"
        ) from None


def record_tensor_meta(node: fx.Node, value: Any) -> None:
    """Write what ``value`` (the node's output) is, as ``ShapeProp`` does: only when it holds a tensor."""
    found = False

    def describe(tensor: torch.Tensor) -> TensorMetadata:
        nonlocal found
        found = True
        return _extract_tensor_metadata(tensor)

    described = pytree.tree_map_only(torch.Tensor, describe, value)
    if found:
        node.meta[TENSOR_META_KEY] = described


def shapes(node: fx.Node) -> tuple[tuple[int, ...], ...]:
    """The shape of each tensor in the node's output, pytree-flattened; ``()`` when none was recorded."""
    return tuple(tuple(meta.shape) for meta in _tensor_metas(node))


def dtypes(node: fx.Node) -> tuple[torch.dtype, ...]:
    """The dtype of each tensor in the node's output, aligned with :func:`shapes`."""
    return tuple(meta.dtype for meta in _tensor_metas(node))


def _tensor_metas(node: fx.Node) -> list[TensorMetadata]:
    described = node.meta.get(TENSOR_META_KEY)
    if described is None:
        return []
    # TensorMetadata is a named tuple: a leaf here, not a container to flatten.
    leaves = pytree.tree_leaves(described, is_leaf=lambda item: isinstance(item, TensorMetadata))
    return [leaf for leaf in leaves if isinstance(leaf, TensorMetadata)]
