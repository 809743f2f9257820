"""The model registry and the YOLOv5 zoo: exact params / FLOPs / state-dict signatures, outputs, config."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from reference import BASE, BASE_STATE_DICTS, YOLOV5L_SHAPES, state_dict_signature
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rewrite.errors import ModelSpecError
from rewrite.zoo import create_model, list_models, register_model
from rewrite.zoo.yolov5 import C3, SPPF, Conv, Detect, DetectionModel

NAMES = ["yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x"]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def meta_models() -> dict[str, nn.Module]:
    with torch.device("meta"):
        return {name: create_model(name).eval() for name in NAMES}


@pytest.fixture(scope="module")
def nano() -> DetectionModel:
    torch.manual_seed(0)
    return create_model("yolov5n")


# ------------------------------------------------------------------ the reference figures (tests/reference.py)


@pytest.mark.parametrize("name", BASE)
def test_params_and_flops_at_640(meta_models, name: str) -> None:
    model, (params, flops) = meta_models[name], BASE[name]
    assert n_params(model) == params
    assert count_flops(model, torch.empty(1, 3, 640, 640, device="meta")) == flops


def test_flops_on_real_data_equal_the_meta_count(nano: DetectionModel) -> None:
    assert count_flops(nano.eval(), torch.randn(1, 3, 640, 640)) == BASE["yolov5n"][1]


@pytest.mark.parametrize("name", BASE_STATE_DICTS)
def test_state_dict_signature(meta_models, name: str) -> None:
    model = meta_models[name]
    assert (len(model.state_dict()), state_dict_signature(model)) == BASE_STATE_DICTS[name]


def test_state_dict_examples(meta_models) -> None:
    state = meta_models["yolov5l"].state_dict()
    assert {key: state[key].shape for key in YOLOV5L_SHAPES} == YOLOV5L_SHAPES
    assert state["model.24.anchors"].shape == (3, 3, 2)
    assert "model.2.m.0.cv1.conv.weight" in state


def test_meta_build_allocates_no_weights(meta_models) -> None:
    tensors = [*meta_models["yolov5l"].parameters(), *meta_models["yolov5l"].buffers()]
    assert tensors and all(t.is_meta for t in tensors)


# --------------------------------------------------------------------------------------------------- outputs


def test_eval_output_at_640(meta_models) -> None:
    boxes, raw = meta_models["yolov5s"](torch.empty(2, 3, 640, 640, device="meta"))
    assert boxes.shape == (2, 25200, 85)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 80, 80, 85), (2, 3, 40, 40, 85), (2, 3, 20, 20, 85)]


def test_train_output_is_the_raw_maps(nano: DetectionModel) -> None:
    raw = nano.train()(torch.randn(2, 3, 64, 64))
    nano.eval()  # the fixture is shared: leave it as the other tests expect it
    assert [tuple(r.shape) for r in raw] == [(2, 3, 8, 8, 85), (2, 3, 4, 4, 85), (2, 3, 2, 2, 85)]


def test_eval_boxes_decode_the_raw_maps(nano: DetectionModel) -> None:
    boxes, raw = nano.eval()(torch.randn(1, 3, 128, 96))
    assert boxes.shape == (1, 3 * (16 * 12 + 8 * 6 + 4 * 3), 85)
    # Level 1 (stride 16, 8x6 cells), anchor 2 (59x119 px), cell x=3, y=5.
    p = raw[1][0, 2, 5, 3].sigmoid()
    row = 3 * 16 * 12 + 2 * 8 * 6 + 5 * 6 + 3
    x, y = (p[0] * 2 - 0.5 + 3) * 16, (p[1] * 2 - 0.5 + 5) * 16
    w, h = (p[2] * 2) ** 2 * 59, (p[3] * 2) ** 2 * 119
    torch.testing.assert_close(boxes[0, row, :4], torch.stack((x, y, w, h)))
    torch.testing.assert_close(boxes[0, row, 4:], p[4:])


def test_cached_grids_follow_the_input_size(nano: DetectionModel) -> None:
    model = nano.eval()
    model(torch.randn(1, 3, 64, 64))
    x = torch.randn(1, 3, 96, 128)
    boxes, _ = model(x)
    fresh = create_model("yolov5n")
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(boxes, fresh.eval()(x)[0])
    grids = [tuple(g.shape) for g in model.model[-1].grid]
    assert grids == [(1, 3, 12, 16, 2), (1, 3, 6, 8, 2), (1, 3, 3, 4, 2)]


def test_nc_and_input_channels_are_configurable() -> None:
    model = create_model("yolov5n", nc=3, ch=1).eval()
    boxes, raw = model(torch.randn(1, 1, 64, 64))
    assert boxes.shape == (1, 252, 8) and raw[0].shape == (1, 3, 8, 8, 8)
    assert model.model[0].conv.in_channels == 1
    assert model.yaml["nc"] == 3 and model.model[-1].nc == 3
    assert [conv.out_channels for conv in model.model[-1].m] == [24, 24, 24]


def test_detect_is_not_fx_traceable(nano: DetectionModel) -> None:
    # On purpose, as in YOLOv5: its grid cache branches on the feature-map shape. The tracer must cope.
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(nano.eval())  # eval: training mode skips the grid and traces


# ---------------------------------------------------------------------------------------------- structure


def test_detect_anchors_and_strides() -> None:
    model = create_model("yolov5n")
    detect = model.model[-1]
    assert isinstance(detect, Detect) and (detect.nc, detect.no, detect.na, detect.nl) == (80, 85, 3, 3)
    assert detect.stride.tolist() == model.stride.tolist() == [8.0, 16.0, 32.0]
    # Pixel anchors divided by the level's stride.
    assert detect.anchors[0].tolist() == [[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]]
    assert detect.anchors[2].tolist() == [[116 / 32, 90 / 32], [156 / 32, 198 / 32], [373 / 32, 326 / 32]]
    assert all(conv.bias is not None for conv in detect.m)


def test_every_batchnorm_uses_the_yolov5_settings(meta_models) -> None:
    for model in meta_models.values():
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.03)}


def test_config_is_kept_as_yaml(meta_models) -> None:
    cfg = meta_models["yolov5m"].yaml
    assert (cfg["nc"], cfg["depth_multiple"], cfg["width_multiple"]) == (80, 0.67, 0.75)
    assert len(cfg["anchors"]) == 3
    assert len(cfg["backbone"]) == 10 and len(cfg["head"]) == 15
    assert cfg["backbone"][-1] == [-1, 1, "SPPF", [1024, 5]]
    assert cfg["head"][-1] == [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]


def test_each_model_owns_its_config() -> None:
    with torch.device("meta"):
        first, second = create_model("yolov5n"), create_model("yolov5n")
    first.yaml["head"][-1][0].append(99)
    assert second.yaml["head"][-1][0] == [17, 20, 23]


def test_layers_carry_index_source_type_and_param_count(meta_models) -> None:
    model = meta_models["yolov5s"]
    rows = model.yaml["backbone"] + model.yaml["head"]
    assert len(model.model) == len(rows) == 25
    for i, (layer, (f, _, name, _)) in enumerate(zip(model.model, rows, strict=True)):
        assert (layer.i, layer.f, layer.type) == (i, f, name.removeprefix("nn."))
        assert layer.np == n_params(layer)
    assert model.save == [4, 6, 10, 14, 17, 20, 23]


def test_depth_and_width_scaling(meta_models) -> None:
    nano, xl = meta_models["yolov5n"].model, meta_models["yolov5x"].model
    # Repeats: max(round(n * depth), 1); channels: ceil(c * width / 8) * 8.
    assert [len(nano[i].m) for i in (2, 4, 6, 8, 13)] == [1, 2, 3, 1, 1]
    assert [len(xl[i].m) for i in (2, 4, 6, 8, 13)] == [4, 8, 12, 4, 4]
    assert [nano[i].conv.out_channels for i in (0, 1, 3, 5, 7)] == [16, 32, 64, 128, 256]
    assert [xl[i].conv.out_channels for i in (0, 1, 3, 5, 7)] == [80, 160, 320, 640, 1280]
    assert isinstance(nano[9], SPPF) and isinstance(nano[23], C3) and isinstance(nano[10], Conv)
    assert not nano[13].m[0].add and nano[2].m[0].add  # the neck's C3s have no residual


def test_unknown_module_in_config() -> None:
    cfg = {**create_model("yolov5n").yaml, "backbone": [[-1, 1, "Conv2", [64, 6, 2, 2]]]}
    with pytest.raises(ModelSpecError, match="layer 0: unknown module 'Conv2'"):
        DetectionModel(cfg)


# ------------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_yolov5_models() -> None:
    assert set(NAMES) <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_suggests_the_nearest() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown model 'yolov5-s'; did you mean 'yolov5s'") as error:
        create_model("yolov5-s")
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in NAMES)
    with pytest.raises(ModelSpecError, match=r"unknown model 'resnet50'; available: yolov5l"):
        create_model("resnet50")


def test_register_model_rejects_a_duplicate_name() -> None:
    def yolov5n() -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="'yolov5n' is already registered"):
        register_model(yolov5n)
