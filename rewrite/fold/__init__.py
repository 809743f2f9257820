"""Fold a model for inference: the same outputs from a leaner graph.

:func:`fold` returns an eval-mode copy in which every ``BatchNorm`` that follows a convolution (whose output
nothing else reads) is folded into that conv, ``Identity`` and ``Dropout`` modules are dropped, and every fixed
permutation of channels (a GSConv channel shuffle: strided slices and a concatenation, an
unflatten-transpose-flatten, an ``index_select``, …) is gone from the graph: the permutation travels with the
values, through channel-wise ops and concatenations, into the weights of the convolutions that read it or, where
two values meet in an elementwise sum, of the one that produces the other operand. Where nothing can take it (a
model output, a reshape, an opaque module), it is applied once, as an ``index_select``, so the result stays exact.

Nothing here knows a particular model: permutations are recognised by what a chain of pure data-movement ops
does to a probe tensor whose entries are all different, so any spelling of a channel shuffle is found; what an op
is (a conv, channel-wise, data movement, …) comes from the op table, :mod:`rewrite.vocabulary`.

Each step is an fx pass over a graph module that :func:`rewrite.tracer.trace` made (its nodes carry their
shapes): :func:`drop_no_ops` and :func:`fold_batch_norms` (in ``batch_norms.py``), :func:`fold_channel_orders`
and :func:`lower_channel_orders` (in ``channel_orders.py``); what they ask of a node is in ``nodes.py``. A pass edits the graph in place and never changes a module it calls: new weights are
a new module. :func:`fold` runs them on a copy of each traced region's graph and puts the result in place of the
region's module, with that module's plain attributes and hooks; a region where nothing folds is left as it was,
and what the tracer kept opaque runs as before, the modules it calls folded as regions of their own.

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
from typing import Any

from torch import fx, nn

from rewrite.fold.batch_norms import drop_no_ops, fold_batch_norms
from rewrite.fold.channel_orders import channel_order, fold_channel_orders, lower_channel_orders
from rewrite.paths import split_path
from rewrite.rewriter import carry_hooks, carry_plain_attributes
from rewrite.tracer import trace

__all__ = [
    "channel_order",
    "drop_no_ops",
    "fold",
    "fold_batch_norms",
    "fold_channel_orders",
    "lower_channel_orders",
]


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
        folded = _fold_graph_module(region.graph_module)
        if folded is None:
            continue
        replaced = result.get_submodule(region.path)
        carry_plain_attributes(replaced, folded)
        carry_hooks(replaced, folded)
        if not region.path:
            result = folded
        else:
            parent, name = split_path(region.path)
            setattr(result.get_submodule(parent), name, folded)
    return result


def _fold_graph_module(traced: fx.GraphModule) -> fx.GraphModule | None:
    """The passes in order, on a copy of ``traced``'s graph; ``None`` when none of them changes anything."""
    work = fx.GraphModule(traced, copy.deepcopy(traced.graph))
    changed = [fold_pass(work) for fold_pass in (drop_no_ops, fold_batch_norms, fold_channel_orders)]
    if not any(changed):
        return None
    fold_batch_norms(work)  # those the shuffles had kept from their conv
    work.graph.eliminate_dead_code()  # chains a shuffle made unneeded, folded BatchNorms
    lowered = lower_channel_orders(work)
    return fx.GraphModule(lowered, lowered.graph, class_name=type(traced).__name__)
