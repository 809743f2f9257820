"""Defects found by the property tests (``tests/promises/test_properties.py``), each minimised to an explicit test.

Each was found failing and is fixed; the test keeps it that way.
"""

from __future__ import annotations

import warnings

import torch
from netgen import INPUT_SHAPE, Conv, Counter, Net, build
from test_properties import GENERIC_RULES, check_rewrite

import rewrite


def _plan(model: torch.nn.Module) -> rewrite.Plan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rewrite.NoMatchWarning)
        return rewrite.plan(model, GENERIC_RULES, torch.zeros(INPUT_SHAPE))


def test_plan_leaves_the_global_rng_alone():
    model = build(Net((Conv(4, norm=False, act=None),)))
    state = torch.random.get_rng_state()
    _plan(model)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_apply_leaves_the_global_rng_alone():
    plan = _plan(build(Net((Conv(4, norm=False, act=None),))))
    state = torch.random.get_rng_state()
    plan.apply()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_plan_leaves_buffers_that_forward_updates_in_place_alone():
    # Found by the property test as Net((Conv(2, k=1, norm=False, act=None), Conv(2, k=1, ...), Counter())).
    model = build(Net((Counter(),)))
    _plan(model)
    assert model.body.parts[0].calls.item() == 0


def test_the_smallest_net_passes_the_property():
    # The shape every regression test here has: the property, on one explicit net.
    check_rewrite(Net((Conv(4),)))
