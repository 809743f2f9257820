"""profile(): totals equal to parameters and FlopCounterMode, hierarchy, stages, meta vs real data, no mutation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from reference import BASE
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rewrite.errors import TraceError
from rewrite.graph import StageMap, resolve_stages
from rewrite.profiler import Cost, Profile, profile
from rewrite.tracer import Leaf
from rewrite.zoo import create_model

CLASSIFIERS = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"]
# The module that was innermost when the meta run hit data-dependent work (nonzero / NMS in the post-processing).
DETECTORS = {
    "fasterrcnn_resnet50_fpn": "RegionProposalNetwork",
    "retinanet_resnet50_fpn": "RetinaNet",
    "fcos_resnet50_fpn": "FCOS",
    "ssdlite320_mobilenet_v3_large": "SSD",
}
NO_STAGES = StageMap()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def counted(model: nn.Module, args: tuple) -> FlopCounterMode:
    """FlopCounterMode over one eager forward, the reference every total is compared against."""
    with FlopCounterMode(display=False) as counter:
        model(*args)
    return counter


def module_flops_from(counter: FlopCounterMode, model: nn.Module) -> dict[str, int]:
    """FlopCounterMode's own per-module figures (ModuleTracker names: root class name, then the module path)."""
    root = type(model).__name__
    counts = counter.get_flop_counts()
    return {
        path: sum(counts.get(f"{root}.{path}" if path else root, {}).values())
        for path, _ in model.named_modules()
    }


def hooks_everywhere(model: nn.Module) -> list[int]:
    global_dicts = [
        getattr(nn.modules.module, name) for name in dir(nn.modules.module) if name.startswith("_global_")
    ]
    per_module = [
        len(getattr(m, name))
        for m in model.modules()
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    ]
    return [len(d) for d in global_dicts if isinstance(d, dict)] + per_module


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and after[key].shape == tensor.shape, key
        assert torch.equal(after[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), (
            key
        )


def assert_consistent(prof: Profile, model: nn.Module) -> None:
    """Invariants every profile keeps: root == total, stages add up to the total."""
    assert prof.modules[""] == prof.total
    assert prof.modules.keys() == dict(model.named_modules()).keys()
    assert sum(prof.stages.values(), Cost(0, 0)) == prof.total


# --- fixtures: each model is built once ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifiers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: getattr(torchvision.models, name)(weights=None).eval() for name in CLASSIFIERS}


@pytest.fixture(scope="module")
def detectors() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    small = {"min_size": 160, "max_size": 160}
    return {
        name: getattr(torchvision.models.detection, name)(
            weights=None, weights_backbone=None, **({} if name.startswith("ssd") else small)
        ).eval()
        for name in DETECTORS
    }


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224)


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.rand(3, 160, 160), torch.rand(3, 128, 160)]


# --- Cost ------------------------------------------------------------------------------------------------------


def test_cost_macs_and_addition() -> None:
    assert Cost(3, 11).macs == 5
    assert Cost(1, 2) + Cost(10, 20) == Cost(11, 22)
    with pytest.raises(TypeError):
        Cost(1, 2) + 3


# --- torchvision classifiers: on meta, equal to FlopCounterMode -------------------------------------------------


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_totals_equal_flop_counter_mode(name: str, classifiers, image) -> None:
    model = classifiers[name]
    prof = profile(model, (image,))  # stages resolved by rewrite.graph
    counter = counted(model, (image,))
    assert prof.total == Cost(n_params(model), counter.get_total_flops())
    assert prof.device == "meta" and prof.needed_real_data == []
    assert_consistent(prof, model)
    # Per module too: the same figures FlopCounterMode's own module tracker gives.
    assert {path: cost.flops for path, cost in prof.modules.items()} == module_flops_from(counter, model)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_on_meta_gives_identical_figures(name: str, classifiers, image) -> None:
    meta_model = copy.deepcopy(classifiers[name]).to("meta")  # some torchvision builders cannot run on meta
    stages = resolve_stages(classifiers[name])
    on_meta = profile(meta_model, (image.to("meta"),), stages=stages)
    on_cpu = profile(classifiers[name], (image,), stages=stages)
    assert on_meta == on_cpu


def test_parent_flops_are_children_plus_own_ops(classifiers, image) -> None:
    # In ResNet every op a module runs itself (residual add, flatten, pooling) costs zero FLOPs, so each module's
    # figure is exactly the sum of its children's.
    model = classifiers["resnet50"]
    prof = profile(model, (image,), stages=NO_STAGES)
    for path, module in model.named_modules():
        children = [f"{path}.{name}" if path else name for name, _ in module.named_children()]
        if children:
            assert prof.modules[path].flops == sum(prof.modules[c].flops for c in children), path
            assert prof.modules[path].params == sum(prof.modules[c].params for c in children), path


# --- torchvision detectors: data-dependent parts run on real data ----------------------------------------------


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_totals_and_real_data_report(name: str, detectors, images) -> None:
    model = detectors[name]
    before = snapshot(model)
    prof = profile(model, (images,))
    counter = counted(model, (images,))
    assert prof.total == Cost(n_params(model), counter.get_total_flops())
    assert {path: cost.flops for path, cost in prof.modules.items()} == module_flops_from(counter, model)
    assert_consistent(prof, model)
    assert prof.device == "cpu"
    [leaf] = prof.needed_real_data
    assert leaf.type_name == DETECTORS[name]
    assert type(model.get_submodule(leaf.path)).__name__ == leaf.type_name
    assert leaf.reason and "\n" not in leaf.reason
    assert_bit_identical(before, model)


def test_detector_on_meta_raises_trace_error(images) -> None:
    with torch.device("meta"):
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=160, max_size=160
        ).eval()
    with pytest.raises(TraceError, match=r"RegionProposalNetwork at 'rpn' .*real device") as raised:
        profile(model, ([i.to("meta") for i in images],), stages=NO_STAGES)
    assert "\n" not in str(raised.value)


# --- small models: attribution, sharing, stages, attention, failures -------------------------------------------


class Twice(nn.Module):
    """Calls ``lin`` twice and does a matrix product of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin(self.lin(x)) @ self.w)


def test_module_called_twice_counts_twice_and_own_ops_go_to_parent() -> None:
    x = torch.randn(3, 4)
    prof = profile(Twice(), (x,), stages=StageMap({"lin": "backbone", "head": "head"}))
    one_lin = 2 * 3 * 4 * 4
    assert prof.modules["lin"] == Cost(20, 2 * one_lin)
    assert prof.modules["head"] == Cost(10, 2 * 3 * 4 * 2)
    assert prof.total == Cost(46, 2 * one_lin + one_lin + 2 * 3 * 4 * 2)
    assert prof.total.flops == counted(Twice(), (x,)).get_total_flops()
    # The root's own matmul and its parameter w belong to no stage.
    assert prof.stages == {
        "backbone": Cost(20, 2 * one_lin),
        "head": Cost(10, 2 * 3 * 4 * 2),
        "other": Cost(16, one_lin),
    }


def test_shared_parameters_count_once_per_module() -> None:
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False))
    model[2].weight = model[0].weight
    prof = profile(model, (torch.randn(2, 8),), stages=NO_STAGES)
    assert prof.total.params == n_params(model) == 64
    assert prof.modules["0"].params == prof.modules["2"].params == 64
    assert prof.stages == {"other": prof.total}


def test_stages_list_only_what_costs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
    stages = StageMap(
        {"0": "backbone", "1": "neck", "2": "head"}
    )  # the ReLU "neck" and the Flatten cost nothing
    prof = profile(model, (torch.randn(1, 3, 8, 8),), stages=stages)
    assert list(prof.stages) == ["backbone", "head"]
    assert_consistent(prof, model)


class Attention(nn.Module):
    """Self-attention (nn.MultiheadAttention, then scaled_dot_product_attention); optionally data-dependent."""

    def __init__(self, data_dependent: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.data_dependent = data_dependent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mha(x, x, x, need_weights=False)[0]
        x = F.scaled_dot_product_attention(x, x, x)
        return x[x > 0] if self.data_dependent else x


def test_attention_counts_the_same_on_meta_and_on_real_cpu_data() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 10, 16)
    on_meta = profile(Attention(data_dependent=False).eval(), (x,), stages=NO_STAGES)
    on_cpu = profile(Attention(data_dependent=True).eval(), (x,), stages=NO_STAGES)
    assert (on_meta.device, on_cpu.device) == ("meta", "cpu")
    length, dim = 10, 16
    projections = 2 * length * dim * 3 * dim + 2 * length * dim * dim
    attention = 2 * (2 * length * length * dim)  # QK^T and AV (heads together span dim)
    # Once inside the MHA, once as the bare call.
    assert on_meta.total.flops == on_cpu.total.flops == projections + 2 * attention


class Inner(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x.sum(1) > 0]  # a variable number of rows: nonzero


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.ReLU(), Inner())
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.norm(self.stem(x)))


def test_innermost_module_is_named_when_meta_fails_and_nothing_changes() -> None:
    model = Outer().train()  # training mode: BatchNorm would update its running statistics
    before, hooks = snapshot(model), hooks_everywhere(model)
    prof = profile(model, (torch.randn(5, 4),), stages=NO_STAGES)
    assert prof.device == "cpu"
    [leaf] = prof.needed_real_data
    assert isinstance(leaf, Leaf) and (leaf.path, leaf.type_name) == ("block.1", "Inner")
    assert "nonzero" in leaf.reason and "\n" not in leaf.reason
    assert prof.total == Cost(n_params(model), 2 * 5 * 4 * 4)
    assert_bit_identical(before, model)
    assert hooks_everywhere(model) == hooks


def test_model_on_meta_that_needs_real_data_raises() -> None:
    model = Outer().to("meta")
    with pytest.raises(TraceError, match=r"Inner at 'block.1' cannot run on the meta device.*real device"):
        profile(model, (torch.randn(5, 4, device="meta"),), stages=NO_STAGES)


def test_model_failing_on_real_data_too_raises() -> None:
    with pytest.raises(TraceError, match=r"fails on its example inputs, in Linear at 'stem'"):
        profile(Outer(), (torch.randn(5, 3),), stages=NO_STAGES)


# --- the zoo's YOLOv5: the reference figures, on CPU and on meta, default stages, no mutation --------------------


@pytest.mark.parametrize("name", BASE)
def test_yolov5_matches_reference_on_cpu_and_meta(name: str) -> None:
    params, flops = BASE[name]
    x = torch.randn(1, 3, 640, 640)
    with torch.device("meta"):
        meta_model = create_model(name).eval()
    on_meta = profile(meta_model, (x.to("meta"),))
    assert on_meta.total == Cost(params, flops)
    assert on_meta.device == "meta"
    assert list(on_meta.stages) == ["backbone", "neck", "head"]
    assert_consistent(on_meta, meta_model)
    if name in (
        "yolov5n",
        "yolov5l",
    ):  # building on CPU initialises weights: two sizes are enough for that path
        model = create_model(name).eval()
        assert profile(model, (x,)) == on_meta


def test_yolov5_left_untouched_and_still_runs() -> None:
    torch.manual_seed(0)
    model = create_model("yolov5n").eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = model(x)[0]  # fills Detect's grid caches with CPU tensors
    before, hooks = snapshot(model), hooks_everywhere(model)
    detect = model.model[-1]
    grids = list(detect.grid)
    prof = profile(model, (x,))
    assert prof.device == "meta"
    # The meta run rebuilt the caches with meta tensors; the originals are back.
    assert all(a is b for a, b in zip(detect.grid, grids))
    assert_bit_identical(before, model)
    assert hooks_everywhere(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(x)[0], expected)
