"""rewrite.save / rewrite.load: a recipe and safetensors weights, round trips, and one-line errors for bad folders."""

import hashlib
import json
import pickle
import textwrap

import pytest
import torch
from reference import SLIM_NECK
from safetensors.torch import load_file, save_file
from torch import nn

import rewrite
from rewrite.zoo import create_model

X = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Weights other than a fresh init's (so that a load that rebuilt fresh weights could not pass)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.01)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """yolov5n slim-neck, saved from Python with its zoo spec."""
    plan = rewrite.plan(create_model("yolov5n").eval(), "slim-neck", X)
    slim = trained_like(plan.apply())
    folder = rewrite.save(slim, plan, tmp_path_factory.mktemp("saved") / "yolov5n-slim", model_spec="yolov5n")
    return slim, folder


def outputs_equal(a, b) -> bool:
    pairs = zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def test_zoo_round_trip_is_bit_identical_and_unpickles_nothing(saved, monkeypatch):
    slim, folder = saved

    def no_pickles(*args, **kwargs):
        raise AssertionError("something unpickled")

    monkeypatch.setattr(pickle, "loads", no_pickles)
    monkeypatch.setattr(pickle, "load", no_pickles)
    monkeypatch.setattr(torch, "load", no_pickles)
    loaded = rewrite.load(folder)

    assert type(loaded) is type(slim) and not loaded.training
    state, expected = loaded.state_dict(), slim.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    with torch.no_grad():
        assert outputs_equal(loaded(X), slim(X))

    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["format_version"] == 1 and recipe["library_version"] == rewrite.__version__
    assert recipe["model"] == {"spec": "yolov5n", "args": {}}
    assert recipe["rules"]["name"] == "slim-neck" and "[[rule]]" in recipe["rules"]["toml"]
    assert recipe["input_shape"] == [1, 3, 64, 64]
    assert recipe["plan"]["params_after"] == SLIM_NECK["yolov5n"][0]
    assert (
        recipe["weights"]["sha256"]
        == hashlib.sha256((folder / "weights.safetensors").read_bytes()).hexdigest()
    )


def test_file_model_round_trip(tmp_path, monkeypatch):
    (tmp_path / "det.py").write_text(
        textwrap.dedent(
            """\
            from rewrite.zoo import create_model

            def build(nc=80):
                return create_model("yolov5n", nc=nc)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    from rewrite.model_spec import load_model

    base = load_model("det.py:build", {"nc": 3})
    plan = rewrite.plan(base, "slim-neck", X)
    slim = trained_like(plan.apply())
    rewrite.save(slim, plan, "out", model_spec="det.py:build", model_args={"nc": 3})
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["model"] == {"spec": f"{tmp_path / 'det.py'}:build", "args": {"nc": 3}}  # absolute path

    monkeypatch.chdir(tmp_path.parent)  # loading works from anywhere
    with pytest.raises(rewrite.RecipeError, match=r"names code to import and run; .* trust_model_code=True"):
        rewrite.load(tmp_path / "out")
    loaded = rewrite.load(tmp_path / "out", trust_model_code=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in slim.state_dict().items())
    with torch.no_grad():
        assert outputs_equal(loaded(X), slim(X))


def test_own_architecture_needs_base_model(tmp_path, saved):
    slim, _ = saved
    plan = rewrite.plan(create_model("yolov5n").eval(), "slim-neck", X)
    folder = rewrite.save(slim, plan, tmp_path / "own")  # no spec recorded
    with pytest.raises(rewrite.RecipeError, match=r"recipe.json: records no model spec .* base_model="):
        rewrite.load(folder)
    base = create_model("yolov5n").eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = rewrite.load(folder, base_model=base)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())  # base_model untouched
    with torch.no_grad():
        assert outputs_equal(loaded(X), slim(X))
    with pytest.raises(
        rewrite.RecipeError, match=r"differs from the saved one .*is base_model the architecture"
    ):
        rewrite.load(folder, base_model=create_model("yolov5s").eval())


def copy_folder(folder, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for name in ("recipe.json", "weights.safetensors"):
        (target / name).write_bytes((folder / name).read_bytes())
    return target


def edit_recipe(folder, change):
    path = folder / "recipe.json"
    recipe = json.loads(path.read_text())
    change(recipe)
    path.write_text(json.dumps(recipe))


def rewrite_weights(folder, change):
    """Change the tensors and record the new file's checksum, so that only the change is wrong."""
    path = folder / "weights.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    edit_recipe(folder, lambda r: r["weights"].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest()))


def truncate(folder):
    path = folder / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def flip_a_byte(folder):
    path = folder / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


BAD = {
    "other-format-version": (
        lambda f: edit_recipe(f, lambda r: r.update(format_version=2)),
        r"recipe.json: format version 2; this rewrite \(version .*\) reads version 1",
    ),
    "recipe-missing-key": (
        lambda f: edit_recipe(f, lambda r: r.pop("rules")),
        r"recipe.json: missing key\(s\) rules$",
    ),
    "recipe-extra-key": (
        lambda f: edit_recipe(f, lambda r: r.update(extra=1)),
        r"recipe.json: unknown key\(s\) extra$",
    ),
    "not-json": (
        lambda f: (f / "recipe.json").write_text("{"),
        r"recipe.json: not valid JSON",
    ),
    "no-recipe": (
        lambda f: (f / "recipe.json").unlink(),
        r"recipe.json: no such file",
    ),
    "missing-weight": (
        lambda f: rewrite_weights(f, lambda t: t.pop("model.10.cv1.conv.weight")),
        r"weights.safetensors: missing 1 key the model has: model.10.cv1.conv.weight$",
    ),
    "extra-weight": (
        lambda f: rewrite_weights(f, lambda t: t.update(surplus=torch.zeros(2))),
        r"weights.safetensors: 1 key the model does not have: surplus$",
    ),
    "wrong-shape": (
        lambda f: rewrite_weights(
            f, lambda t: t.update({"model.10.cv2.conv.weight": torch.zeros(64, 1, 3, 3)})
        ),
        (
            r"weights.safetensors: model.10.cv2.conv.weight is \(64, 1, 3, 3\) torch.float32, the model needs "
            r"\(64, 1, 5, 5\) torch.float32"
        ),
    ),
    "corrupted": (
        flip_a_byte,
        r"weights.safetensors: sha256 .* the file is corrupted, truncated or from another save",
    ),
    "truncated": (
        truncate,
        r"weights.safetensors: sha256 .* the file is corrupted, truncated or from another save",
    ),
    "no-weights": (
        lambda f: (f / "weights.safetensors").unlink(),
        r"weights.safetensors: cannot read the weights: No such file",
    ),
}


@pytest.mark.parametrize("damage", BAD.values(), ids=BAD.keys())
def test_a_bad_folder_is_a_one_line_error_naming_the_file(saved, tmp_path, damage):
    spoil, message = damage
    folder = copy_folder(saved[1], tmp_path)
    spoil(folder)
    with pytest.raises(rewrite.RecipeError, match=message) as caught:
        rewrite.load(folder)
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)


def test_save_refuses_what_it_could_not_load_back(tmp_path):
    with torch.device("meta"):
        model = create_model("yolov5n").eval()
    plan = rewrite.plan(model, "slim-neck", X.to("meta"))
    with pytest.raises(rewrite.RecipeError, match="has no data .meta device."):
        rewrite.save(plan.apply(), plan, tmp_path / "meta", model_spec="yolov5n")
    assert not (tmp_path / "meta").exists()


class DictOfImages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())

    def forward(self, batch, scale=1.0):
        return self.conv(batch["image"]) * scale


@pytest.mark.parametrize(
    ("inputs", "described"),
    [
        (({"image": torch.rand(1, 3, 8, 8)},), r"\(dict\)"),
        (({"image": torch.rand(1, 3, 8, 8)}, 2.0), r"\(dict, float\)"),
    ],
)
def test_save_refuses_example_inputs_a_recipe_cannot_record(tmp_path, inputs, described):
    plan = rewrite.plan(DictOfImages().eval(), "gsconv-only", inputs, scope="*")
    with pytest.raises(
        rewrite.RecipeError, match=rf"made on example inputs {described}; a recipe records one"
    ):
        rewrite.save(plan.apply(), plan, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
