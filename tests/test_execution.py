"""rewrite.execution: meta runs that leave the model as it was, the real-data fallback, and its failures."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rewrite.execution import (
    RunFailed,
    Runner,
    attributes_restored,
    on_meta_else_real,
    run,
)


class GridCache(nn.Module):
    """Caches a grid per input size in a list, as YOLO's Detect does, and notes the last input on itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.grid = [torch.zeros(1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid[0].shape != x.shape[2:]:
            self.grid[0] = torch.zeros(x.shape[2:], device=x.device)
        self.last_input = x
        return self.conv(x) + self.grid[0]


class Rows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x.sum(1) > 0]  # how many rows: only the values can tell (nonzero has no meta kernel)


class Net(nn.Module):
    """A train-mode BatchNorm and a Dropout before a part that needs real data."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.block = nn.Sequential(nn.Dropout(0.5), Rows())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.norm(self.stem(x)))


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_state_equal(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].device == tensor.device and torch.equal(after[name], tensor), name


def test_a_meta_run_restores_what_the_forward_replaced_or_refilled() -> None:
    model = GridCache()
    model(torch.randn(1, 3, 8, 8))  # the cache filled, as in a model in use
    grid_list, grid, state = model.grid, model.grid[0], state_of(model)
    attributes = {name: dict(vars(module)) for name, module in model.named_modules()}

    outcome = run(model, (torch.randn(2, 3, 16, 16),))  # another size: the forward refills the cache

    assert outcome.device == torch.device("meta") and outcome.meta_failure is None
    assert outcome.value.is_meta and outcome.value.shape == (2, 4, 16, 16)
    assert model.grid is grid_list and model.grid[0] is grid  # the same list, holding the real grid again
    assert {name: dict(vars(module)) for name, module in model.named_modules()} == attributes
    assert_state_equal(state, model)


def test_a_runner_runs_any_module_on_the_models_stand_ins() -> None:
    model = GridCache()
    runner = Runner(model, on_meta=True)
    # A module outside the model that calls the model's modules, as a traced region does.
    region = nn.Sequential(model.conv)
    region.seen = []
    region.register_forward_hook(lambda module, args, output: region.seen.append(output.device))

    output = runner.run(region, [torch.randn(1, 3, 4, 4)])

    assert output.is_meta and region.seen == [torch.device("meta")]  # the outsider keeps what it recorded
    assert not model.conv.weight.is_meta


def test_the_real_data_fallback_names_the_innermost_failing_module() -> None:
    model, x = Net().eval(), torch.randn(6, 4)

    outcome = run(model, (x,))

    assert outcome.device == torch.device("cpu")
    failure = outcome.meta_failure
    assert (failure.on_meta, failure.path, failure.type_name) == (True, "block.1", "Rows")
    assert failure.where == "Rows at 'block.1'"
    assert "nonzero" in failure.reason and "\n" not in failure.reason
    assert failure.reason.endswith(f"(test_execution.py:{Rows.forward.__code__.co_firstlineno + 1})")
    assert isinstance(failure.__cause__, NotImplementedError) and failure.error is failure.__cause__
    torch.testing.assert_close(outcome.value, model(x))


def test_a_real_data_run_leaves_train_mode_statistics_and_the_random_generator_untouched() -> None:
    model, x = Net().train(), torch.randn(6, 4)
    state, rng = state_of(model), torch.get_rng_state()

    outcome = run(model, (x,))

    assert outcome.meta_failure is not None and not outcome.value.is_meta  # ran on real data, in train mode
    assert_state_equal(state, model)  # running_mean, running_var and num_batches_tracked included
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout's draws were taken from a fork
    reference = copy.deepcopy(model)
    torch.manual_seed(0)
    expected = reference(x)
    torch.manual_seed(0)
    assert torch.equal(run(model, (x,)).value, expected)  # batch statistics, as a train-mode forward uses


def test_a_model_on_meta_that_cannot_run_there_raises_the_meta_failure() -> None:
    model = Net().to("meta")
    attempts: list[bool] = []

    def attempt(runner: Runner) -> object:
        attempts.append(runner.on_meta)
        return runner.run(model, (torch.randn(6, 4, device="meta"),))

    with pytest.raises(RunFailed, match=r"^Rows at 'block.1' fails on the meta device: \w+Error") as info:
        on_meta_else_real(model, (), attempt)
    assert info.value.on_meta and attempts == [True]  # no real data, so no second attempt
    assert isinstance(info.value.error, NotImplementedError)


def test_real_inputs_of_a_meta_model_are_no_real_data_either() -> None:
    with pytest.raises(RunFailed, match=r"^Rows at 'block.1' fails on the meta device"):
        run(Net().to("meta"), (torch.randn(6, 4),))


def test_a_model_failing_on_real_data_too_raises_that_failure() -> None:
    with pytest.raises(RunFailed, match=r"^Linear at 'stem' fails on real data: RuntimeError") as info:
        run(Net(), (torch.randn(6, 3),))
    assert not info.value.on_meta and "\n" not in str(info.value)


def test_an_attempt_starts_again_from_scratch_on_real_data() -> None:
    model, x = Net().eval(), torch.randn(6, 4)
    devices: list[torch.device] = []

    def attempt(runner: Runner) -> torch.Tensor:
        devices.append(runner.run(model.stem, (x,)).device)  # runs on meta, then on real data
        return runner.run(model, (x,))

    outcome = on_meta_else_real(model, x, attempt)

    assert devices == [torch.device("meta"), torch.device("cpu")]
    assert outcome.meta_failure.path == "block.1" and outcome.value.device == torch.device("cpu")


def test_attributes_are_restored_in_place_and_new_ones_removed() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    cache = {"anchors": torch.ones(1)}
    model[0].cache = cache
    weight = model[0].weight
    with attributes_restored(model):
        model[0].cache["anchors"] = None
        model[0].cache = {}
        model[0].weight = nn.Parameter(torch.zeros(2, 2))
        model[0].scratch = 1
        model.append(nn.ReLU())
    assert model[0].cache is cache and torch.equal(cache["anchors"], torch.ones(1))
    assert model[0].weight is weight and not hasattr(model[0], "scratch") and len(model) == 1
