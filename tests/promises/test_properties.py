"""Property tests: random conv networks through ``rewrite.plan()`` and ``Plan.apply()``.

For every generated network (:mod:`tests.netgen`: chains, branches, residual adds, concats, strided, grouped and
dilated convs, optional BN, module / functional / method / shared activations, a unit called twice, nesting
into submodules, a module whose forward branches on data, mixed train/eval flags, a forward hook) and two rule
sets — the built-in ``gsconv-only`` and
a generic chain rule over the whole model —

- ``plan()`` and ``apply()`` either succeed or raise a :class:`rewrite.RewriteError` subclass;
- on success the rewritten copy runs and keeps the output structure and shapes;
- the user's model is untouched: state dict (bit for bit, device and dtype), module types, training flags and
  hooks are what they were, and running the rewritten copy does not change them either.

The examples come from the hypothesis profile that ``tests/conftest.py`` loads: ``ci`` by default
(derandomized, 200 examples, no database), so a failure reproduces on every run; ``HYPOTHESIS_PROFILE=explore``
draws new examples. Each defect found this way is kept as an explicit test in ``tests/promises/test_regressions.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given
from netgen import INPUT_SHAPE, Net, build, nets
from rule_sets import chain_rules
from torch import nn

import rewrite

pytestmark = pytest.mark.usefixtures("one_thread")

GENERIC_RULES = chain_rules(name="generic")  # every conv chain, anywhere, to GSConv
# gsconv-only's own scope is the neck, which these nets lack: its rules look at the whole model instead.
RULE_SETS = (dataclasses.replace(rewrite.load_rules("gsconv-only"), scope=None), GENERIC_RULES)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What must not change about the user's model: every tensor bit for bit, and each module's type, mode
    and hooks, by path (shared modules under each of their paths)."""
    modules = list(model.named_modules(remove_duplicate=False))
    return {
        "state": {
            name: (tensor.device, tensor.dtype, tuple(tensor.shape), _bits(tensor))
            for name, tensor in model.state_dict(keep_vars=True).items()
        },
        "types": [(name, type(module)) for name, module in modules],
        "training": [(name, module.training) for name, module in modules],
        "hooks": [
            (name, list(module._forward_hooks.values()), list(module._forward_pre_hooks.values()))
            for name, module in modules
        ],
    }


def _bits(tensor: torch.Tensor) -> bytes | None:
    if tensor.device.type == "meta":
        return None
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def structure(output: Any) -> Any:
    """An output's nesting and shapes, without values."""
    if isinstance(output, torch.Tensor):
        return ("tensor", tuple(output.shape))
    if isinstance(output, dict):
        return {key: structure(value) for key, value in output.items()}
    if isinstance(output, (tuple, list)):
        return (type(output).__name__, [structure(item) for item in output])
    return type(output).__name__


def check_rewrite(spec: Net) -> None:
    """The property, for one network and both rule sets (see the module docstring)."""
    model = build(spec)
    example = torch.rand(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = structure(copy.deepcopy(model)(example))
    before = snapshot(model)
    for rules in RULE_SETS:
        rewritten = None
        random_state = torch.random.get_rng_state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rewrite.NoMatchWarning)
            try:
                rewritten = rewrite.plan(model, rules, example).apply()
            except rewrite.RewriteError:
                pass  # a clean refusal is a fine outcome; the model must still be untouched
        assert snapshot(model) == before, f"{_name(rules)}: the user's model changed"
        assert torch.equal(torch.random.get_rng_state(), random_state), (
            f"{_name(rules)}: the global RNG moved"
        )
        if rewritten is not None:
            with torch.no_grad():
                assert structure(rewritten(example)) == expected, f"{_name(rules)}: outputs changed"
            assert snapshot(model) == before, f"{_name(rules)}: running the copy changed the user's model"


def _name(rules: object) -> str:
    return rules if isinstance(rules, str) else rules.name


@given(nets())
def test_plan_and_apply_leave_the_model_untouched_and_keep_its_outputs(spec: Net) -> None:
    check_rewrite(spec)
