"""A folder someone else wrote is safe to open: rewrite.load runs no code it names, and every bad folder is one line.

Each case of the corpus spoils a copy of a good saved rewrite (yolov5n, slim-neck) the way a hostile or careless
author could, then loads it. Either the load is right (the saved weights come back) or it raises a one-line
``RecipeError`` naming the folder; in every case nothing the folder names was imported or run: the hostile specs
and modules would create ``MARKER`` (and a module would stay in ``sys.modules``).
"""

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rewrite
from rewrite.cli import main
from rewrite.zoo import create_model, list_models

X = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
HOSTILE_MODULE = "hostile_recipe_module"  # on sys.path while a case runs; importing it creates MARKER


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """yolov5n slim-neck saved with its zoo spec, and its state dict."""
    plan = rewrite.plan(create_model("yolov5n").eval(), "slim-neck", X)
    slim = plan.apply().eval()
    folder = rewrite.save(slim, plan, tmp_path_factory.mktemp("saved") / "good", model_spec="yolov5n")
    return folder, slim.state_dict()


@dataclass
class Hostile:
    """A copy of the good folder to spoil, the marker a hostile spec would create, and code that would create it."""

    folder: Path
    marker: Path
    evil_file: Path  # its top level and its build() create the marker
    load_options: dict

    def edit(self, change: Callable[[dict], object]) -> None:
        path = self.folder / "recipe.json"
        recipe = json.loads(path.read_text())
        change(recipe)
        path.write_text(json.dumps(recipe))

    def write(self, text: str | bytes) -> None:
        path = self.folder / "recipe.json"
        path.write_bytes(text.encode() if isinstance(text, str) else text)

    def replace(self, old: str, new: str) -> None:
        text = (self.folder / "recipe.json").read_text()
        assert old in text
        self.write(text.replace(old, new, 1))

    def spec(self, spec: str, **args: object) -> None:
        self.edit(lambda recipe: recipe.update(model={"spec": spec, "args": args}))

    def toml(self, change: Callable[[str], str]) -> None:
        self.edit(lambda recipe: recipe["rules"].update(toml=change(recipe["rules"]["toml"])))

    def weights_link(self, target: Path | str) -> None:
        link = self.folder / "weights.safetensors"
        link.unlink()
        link.symlink_to(target)


@pytest.fixture
def hostile(saved, tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    code = tmp_path / "code"
    code.mkdir()
    touch = f"open({str(marker)!r}, 'w').close()"
    (code / f"{HOSTILE_MODULE}.py").write_text(f"{touch}\n\ndef build():\n    {touch}\n")
    evil = code / "evil.py"
    evil.write_text(f"{touch}\n\ndef build(**kwargs):\n    {touch}\n")
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.chdir(code)  # so that the relative "evil.py:build" names the file
    folder = tmp_path / "folder"
    shutil.copytree(saved[0], folder)
    yield Hostile(folder, marker, evil, {})
    sys.modules.pop(HOSTILE_MODULE, None)


def shell(h: Hostile) -> str:
    return f"touch {h.marker}"


def base_model(h: Hostile) -> None:
    h.load_options["base_model"] = create_model("yolov5n").eval()


def fifo(path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this platform")
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def weights_elsewhere(h: Hostile) -> None:
    outside = h.folder.parent / "elsewhere.safetensors"
    shutil.copy(h.folder / "weights.safetensors", outside)
    h.weights_link(outside)


def weights_under_another_name(h: Hostile) -> None:
    (h.folder / "weights.safetensors").rename(h.folder / "real.safetensors")
    (h.folder / "link.safetensors").symlink_to("real.safetensors")
    h.edit(lambda recipe: recipe["weights"].update(file="link.safetensors"))


def pipe_as_weights(h: Hostile) -> None:
    fifo(h.folder / "pipe")
    h.edit(lambda recipe: recipe["weights"].update(file="pipe"))


NAMES_CODE = r"names code to import and run; .* base_model=\.\.\.\), or, .* trust_model_code=True"
LOADS = None  # the load is right: the saved weights come back

# id: (how the folder is spoiled, the one line it gets: a regex searched in the message, or LOADS)
CORPUS: dict[str, tuple[Callable[[Hostile], object], str | None]] = {
    # A model spec that names code: refused before anything is imported.
    "spec os:system": (
        lambda h: h.spec("os:system", command=shell(h)),
        rf"model spec 'os:system' {NAMES_CODE}",
    ),
    "spec subprocess:getoutput": (
        lambda h: h.spec("subprocess:getoutput", cmd=shell(h)),
        rf"model spec 'subprocess:getoutput' {NAMES_CODE}",
    ),
    "spec builtins:exec": (
        lambda h: h.spec("builtins:exec", source=f"open({str(h.marker)!r}, 'w')"),
        rf"model spec 'builtins:exec' {NAMES_CODE}",
    ),
    "spec importlib:import_module": (
        lambda h: h.spec("importlib:import_module", name=HOSTILE_MODULE),
        rf"model spec 'importlib:import_module' {NAMES_CODE}",
    ),
    "spec local module on sys.path": (
        lambda h: h.spec(f"{HOSTILE_MODULE}:build"),
        rf"model spec '{HOSTILE_MODULE}:build' {NAMES_CODE}",
    ),
    "spec absolute file.py:callable": (
        lambda h: h.spec(f"{h.evil_file}:build"),
        rf"evil.py:build' {NAMES_CODE}",
    ),
    "spec relative file.py:callable": (
        lambda h: h.spec("evil.py:build"),
        rf"model spec 'evil.py:build' {NAMES_CODE}",
    ),
    "spec file.py alone": (lambda h: h.spec("evil.py"), rf"model spec 'evil.py' {NAMES_CODE}"),
    "spec os:system, base_model given": (
        lambda h: (h.spec("os:system", command=shell(h)), base_model(h)),
        LOADS,
    ),
    "spec unknown zoo name": (
        lambda h: h.spec("yolov9z"),
        rf"model spec 'yolov9z' is not a zoo model \({', '.join(list_models())}\)$",
    ),
    "spec not text": (
        lambda h: h.edit(lambda r: r["model"].update(spec=42)),
        r"model.spec must be text, got 42$",
    ),
    "spec with an extra key": (
        lambda h: h.edit(lambda r: r["model"].update(code="import os")),
        r"unknown key\(s\) code in model$",
    ),
    "model args not an object": (
        lambda h: h.edit(lambda r: r["model"].update(args=["touch"])),
        r"model.args must be an object, got \['touch'\]$",
    ),
    # recipe.json that is not JSON a recipe could be.
    "json 200000 nested [": (
        lambda h: h.write("[" * 200_000),
        r"not valid JSON: lists or objects nested too deeply",
    ),
    "json 200000 nested {": (
        lambda h: h.write('{"a":' * 200_000),
        r"not valid JSON: lists or objects nested too deeply",
    ),
    "json a list": (lambda h: h.write("[]"), r'not a rewrite recipe \(no "format": "rewrite-recipe"\)$'),
    "json duplicate key": (
        lambda h: h.replace('"model": {', '"model": {"spec": "os:system", "args": {}}, "model": {'),
        r"not valid JSON: key 'model' appears twice in one object$",
    ),
    "json NaN": (
        lambda h: h.replace('"params_after": ', '"params_after": NaN, "x": '),
        r"not valid JSON: NaN is not",
    ),
    "json Infinity": (
        lambda h: h.replace('"params_after": ', '"params_after": -Infinity, "x": '),
        r"not valid JSON: -Infinity is not a JSON number$",
    ),
    "json 1e999": (
        lambda h: h.replace('"params_after": ', '"params_after": 1e999, "x": '),
        r"not valid JSON: 1e999 is too large for a number$",
    ),
    "json 100000-digit integer": (
        lambda h: h.replace('"params_after": ', f'"params_after": {"9" * 100_000}, "x": '),
        r"not valid JSON: an integer of 100,000 digits; no figure in a recipe has more than 40$",
    ),
    "json not UTF-8": (lambda h: h.write(b'{"format": "\xff"}'), r"not UTF-8 text"),
    "json 17 MB": (lambda h: h.write(" " * 17 * 2**20), r"17,825,792 bytes, more than a recipe ever holds"),
    "recipe.json a pipe": (
        lambda h: fifo(h.folder / "recipe.json"),
        r"cannot read the recipe: not a regular file$",
    ),
    # A key of the wrong type or value.
    "format_version true": (
        lambda h: h.edit(lambda r: r.update(format_version=True)),
        r"format version True; this rewrite \(version .*\) reads version 1",
    ),
    "rules.toml a number": (
        lambda h: h.edit(lambda r: r["rules"].update(toml=7)),
        r"rules.toml must be text, got 7$",
    ),
    "scope a number": (
        lambda h: h.edit(lambda r: r.update(scope=7)),
        r"scope must be text or a list or null, got 7$",
    ),
    "scope a list of numbers": (
        lambda h: h.edit(lambda r: r.update(scope=[1, 2])),
        r"scope must be null, text or a non-empty list of text, got \[1, 2\]$",
    ),
    "plan figure text": (
        lambda h: h.edit(lambda r: r["plan"].update(params_after="1")),
        r"plan.params_after must be an integer, got '1'$",
    ),
    "weights.sha256 not hex": (
        lambda h: h.edit(lambda r: r["weights"].update(sha256="../../etc")),
        r"weights.sha256 must be 64 lowercase hex digits, got '../../etc'$",
    ),
    "weights.tensors true": (
        lambda h: h.edit(lambda r: r["weights"].update(tensors=True)),
        r"weights.tensors must be an integer, got True$",
    ),
    # An input shape that would allocate what the recipe asks blindly.
    "input_shape 1,3,200000,200000": (
        lambda h: h.edit(lambda r: r.update(input_shape=[1, 3, 200_000, 200_000])),
        r"input_shape \[1, 3, 200000, 200000\] needs 480 GB for the example input alone, more than this machine",
    ),
    "input_shape beyond int64": (
        lambda h: h.edit(lambda r: r.update(input_shape=[2**62, 2**62])),
        r"input_shape \[4611686018427387904, 4611686018427387904\] needs 8.51e\+28 GB",
    ),
    "input_shape with a float": (
        lambda h: h.edit(lambda r: r.update(input_shape=[1, 3, 64.0, 64])),
        r"input_shape must be a list of positive integers, got \[1, 3, 64.0, 64\]$",
    ),
    "input_shape with true": (
        lambda h: h.edit(lambda r: r.update(input_shape=[1, True, 64, 64])),
        r"input_shape must be a list of positive integers, got \[1, True, 64, 64\]$",
    ),
    "input_shape 3-d": (
        lambda h: h.edit(lambda r: r.update(input_shape=[3, 64, 64])),
        r"DetectionModel does not run on the example inputs",
    ),
    "input_shape 100000 dimensions": (
        lambda h: h.edit(lambda r: r.update(input_shape=[1] * 100_000)),
        r"DetectionModel does not run on the example inputs: RuntimeError: Expected 3D \(unbatched\) or 4D",
    ),
    "rules named with 1 MB of text": (
        lambda h: h.edit(lambda r: r["rules"].update(name="x" * 2**20, toml="not toml")),
        r"recipe.json \(rules 'xxx+…\): invalid TOML",
    ),
    # Zoo arguments that would build an absurd model.
    "zoo nc=10**7": (
        lambda h: h.edit(lambda r: r["model"]["args"].update(nc=10**7)),
        r"model 'yolov5n' with args \{'nc': 10000000\} holds 54.1 GB of weights, and the weights file 6.72 MB; a rewrite does not shrink",
    ),
    "zoo ch=10**6": (
        lambda h: h.edit(lambda r: r["model"]["args"].update(ch=10**6)),
        r"model 'yolov5n' with args \{'ch': 1000000\} holds 2.31 GB of weights",
    ),
    "zoo nc=10**30": (
        lambda h: h.edit(lambda r: r["model"]["args"].update(nc=10**30)),
        r"model 'yolov5n' cannot be built with args \{'nc': 10+\}: TypeError: .*Overflow",
    ),
    "zoo nc text": (
        lambda h: h.edit(lambda r: r["model"]["args"].update(nc="80")),
        r"model 'yolov5n': argument nc must be a positive integer \(the number of classes\), got '80'$",
    ),
    "zoo unknown argument": (
        lambda h: h.edit(lambda r: r["model"]["args"].update(exec="touch")),
        r"recipe.json: model 'yolov5n' takes no argument 'exec'; it takes: nc, ch$",
    ),
    # Weights that are not a file in the folder.
    "weights.file absolute": (
        lambda h: h.edit(lambda r: r["weights"].update(file="/etc/passwd")),
        r"weights.file must be a file name in the recipe's folder, got '/etc/passwd'$",
    ),
    "weights.file ..": (
        lambda h: h.edit(lambda r: r["weights"].update(file="../folder/weights.safetensors")),
        r"weights.file must be a file name in the recipe's folder, got '../folder/weights.safetensors'$",
    ),
    "weights a link outside the folder": (
        weights_elsewhere,
        r"weights.safetensors: a link to a file outside the recipe's folder; the weights must be in it$",
    ),
    "weights a link to /dev/zero": (
        lambda h: h.weights_link("/dev/zero"),
        r"weights.safetensors: a link to a file outside the recipe's folder",
    ),
    "weights a pipe": (pipe_as_weights, r"pipe: cannot read the weights: not a regular file$"),
    "weights a link inside the folder": (weights_under_another_name, LOADS),
    # Rules are data: a hostile rule text is a rule error, never an import.
    "rules builder os.system": (
        lambda h: h.toml(
            lambda text: text.replace('replace.builder = "GSConv"', 'replace.builder = "os.system"')
        ),
        r"recipe.json \(rules 'slim-neck'\): rule 'conv-to-gsconv': replace.builder: unknown builder 'os.system'",
    ),
    "rules 100000 nested arrays": (
        lambda h: h.toml(lambda text: text + "x = " + "[" * 100_000),
        r"invalid TOML: arrays or tables nested too deeply to read",
    ),
    "scope matches nothing": (
        lambda h: h.edit(lambda r: r.update(scope="model.99")),
        r"recipe.json: scope 'model.99' matches no module of DetectionModel",
    ),
}


@pytest.mark.parametrize("case", CORPUS.values(), ids=CORPUS.keys())
def test_a_hostile_folder_runs_nothing_and_is_one_line(hostile, saved, case):
    spoil, expected = case
    spoil(hostile)
    if expected is LOADS:
        loaded = rewrite.load(hostile.folder, **hostile.load_options)
        state = saved[1]
        assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())
    else:
        with pytest.raises(rewrite.RecipeError, match=expected) as caught:
            rewrite.load(hostile.folder, **hostile.load_options)
        message = str(caught.value)
        assert "\n" not in message and str(hostile.folder) in message and len(message) < 600
    assert not hostile.marker.exists()
    assert HOSTILE_MODULE not in sys.modules and "_rewrite_model_evil" not in sys.modules


# The trusted path: a recipe that `rewrite apply` wrote for a package.module:callable model.

TINY = """\
import os
from torch import nn

open(os.environ["REWRITE_TEST_MARKER"], "a").write("imported\\n")

def build(width=16):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU(),
        nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU(),
        nn.Conv2d(width, 4, 1),
    )
"""


def test_a_recipe_naming_a_module_loads_only_when_trusted(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "imported"
    monkeypatch.setenv("REWRITE_TEST_MARKER", str(marker))
    (tmp_path / "tinydet_for_recipes.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    apply = (
        "apply tinydet_for_recipes:build --model-arg width=8 --rules gsconv-only --scope * --input 1,3,32,32"
    )
    assert main([*apply.split(), "--output", "out", "-q"]) == 0, capsys.readouterr().err
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["model"] == {"spec": "tinydet_for_recipes:build", "args": {"width": 8}}
    sys.modules.pop("tinydet_for_recipes")  # a new process: the module is not imported yet
    marker.unlink()

    with pytest.raises(rewrite.RecipeError, match=rf"model spec 'tinydet_for_recipes:build' {NAMES_CODE}"):
        rewrite.load(tmp_path / "out")
    assert main(["export", "out", "--input", "1,3,32,32", "--output", "m.onnx", "-q"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("rewrite: error: ") and "names code to import and run" in error
    assert "--trust-model-code" in error and error.count("\n") == 1
    assert not marker.exists() and "tinydet_for_recipes" not in sys.modules and not Path("m.onnx").exists()

    loaded = rewrite.load(tmp_path / "out", trust_model_code=True)
    assert marker.read_text() == "imported\n"
    weights = load_file(tmp_path / "out" / "weights.safetensors")
    assert {key: value.shape for key, value in loaded.state_dict().items()} == {
        key: value.shape for key, value in weights.items()
    }
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in weights.items())
    assert type(loaded).__name__ == "Sequential" and not loaded.training
    code = main(["export", "out", "--trust-model-code", "--input", "1,3,32,32", "--output", "m.onnx", "-q"])
    assert code == 0, capsys.readouterr().err
    assert Path("m.onnx").is_file()
