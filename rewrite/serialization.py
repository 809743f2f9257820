"""Save a rewritten model and load it back, without pickles.

A saved rewrite is a folder with two files:

* ``recipe.json`` — how to rebuild the architecture: the format version, the library version, the model spec
  and its arguments (a zoo name, ``package.module:callable`` or ``file.py:callable``), the rule set's name and
  full TOML text, the scope, the input shape, the plan's figures, and the sha256 of the weights file;
* ``weights.safetensors`` — the rewritten model's ``state_dict`` (safetensors: tensors and nothing else).

:func:`load` rebuilds the base model from the spec (or takes the ``base_model`` you pass for an architecture of
your own), redoes the same rewrite, checks that it gives the recorded figures, verifies the checksum and loads
the weights strictly. Nothing on that path unpickles anything; the only code it runs is the model spec's, as
``rewrite plan`` would. A recipe names code to import: load one only if you would run its model.

>>> import tempfile, torch, rewrite
>>> from rewrite.zoo import create_model
>>> x = torch.rand(1, 3, 64, 64)
>>> plan = rewrite.plan(create_model("yolov5n").eval(), "slim-neck", x)
>>> slim = plan.apply()
>>> folder = save(slim, plan, tempfile.mkdtemp(), model_spec="yolov5n")
>>> sorted(p.name for p in folder.iterdir())
['recipe.json', 'weights.safetensors']
>>> again = load(folder)
>>> torch.equal(again(x)[0], slim(x)[0])
True
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewrite.errors import RecipeError
from rewrite.files import write_atomically

__all__ = ["FORMAT_VERSION", "RECIPE_FILE", "WEIGHTS_FILE", "load", "recipe_files", "save"]

FORMAT = "rewrite-recipe"
FORMAT_VERSION = 1
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "weights.safetensors"

_KEYS = {
    "format",
    "format_version",
    "library_version",
    "model",
    "rules",
    "scope",
    "input_shape",
    "plan",
    "weights",
}


def save(
    model: nn.Module,
    plan: Any,
    directory: str | os.PathLike[str],
    *,
    model_spec: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory/recipe.json`` and ``directory/weights.safetensors`` for ``model``, the result of ``plan``.

    ``model_spec`` (with ``model_args``) is how :func:`load` rebuilds the base model: a zoo name,
    ``package.module:callable`` or ``file.py:callable`` (a file's path is recorded absolute). Without it the
    recipe records no spec, and :func:`load` needs the base model passed in. Both files are written in full
    before either replaces what was there. Returns the folder.
    """
    files = recipe_files(model, plan, model_spec=model_spec, model_args=model_args)
    folder = Path(directory)
    try:
        write_atomically({folder / name: content for name, content in files.items()})
    except OSError as error:
        raise RecipeError(f"{folder}: cannot write the recipe there: {error.strerror or error}") from error
    return folder


def recipe_files(
    model: nn.Module, plan: Any, *, model_spec: str | None = None, model_args: dict[str, Any] | None = None
) -> dict[str, bytes]:
    """The two files of a saved rewrite, by name, as bytes (for writers that add files of their own)."""
    from rewrite import __version__

    prepared = getattr(plan, "_prepared", None)
    if prepared is None:
        raise RecipeError("this plan was not made by rewrite.plan(); it records no rewrite to save")
    if not prepared.rule_set.text:
        raise RecipeError(
            f"rule set {prepared.rule_set.name!r} was built in Python, not parsed from TOML: a recipe keeps "
            "the rule file's text; load the rules with rewrite.load_rules or rewrite.parse_rules"
        )
    inputs = prepared.example_inputs
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
        described = ", ".join(type(value).__name__ for value in inputs)
        raise RecipeError(
            f"the plan was made on example inputs ({described}); a recipe records one input tensor, so "
            "rewrite.load could not redo the rewrite: save the state dict and plan again on load instead"
        )
    state = _state_tensors(model)
    weights = _safetensors().save(state)
    try:
        arguments = json.loads(json.dumps(model_args or {}, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise RecipeError(
            f"model_args must be plain JSON values (numbers, text, true/false, null): {error}"
        ) from None
    recipe = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model": None if model_spec is None else {"spec": _absolute_spec(model_spec), "args": arguments},
        "rules": {"name": prepared.rule_set.name, "toml": prepared.rule_set.text},
        "scope": list(prepared.scope) if isinstance(prepared.scope, (list, tuple)) else prepared.scope,
        "input_shape": list(plan.input_shapes[0]),
        "plan": _figures(plan),
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": hashlib.sha256(weights).hexdigest(),
            "tensors": len(state),
        },
    }
    return {RECIPE_FILE: (json.dumps(recipe, indent=2) + "\n").encode("utf-8"), WEIGHTS_FILE: weights}


def load(directory: str | os.PathLike[str], base_model: nn.Module | None = None) -> nn.Module:
    """The rewritten model saved in ``directory`` (in eval mode): rebuilt from its recipe, weights loaded strictly.

    ``base_model`` is the model the rewrite was made from, for an architecture that the recipe records no spec
    for (it is not modified); without it the recipe's spec builds one. Anything wrong with the folder — a
    missing file, another format version, missing or extra keys, wrong shapes, a corrupted or truncated
    weights file, a rewrite that no longer gives the recorded figures — raises
    :class:`~rewrite.errors.RecipeError` naming the file and what is wrong.
    """
    from rewrite.planner import plan as make_plan
    from rewrite.rules import parse_rules

    folder = Path(directory)
    recipe_path = folder / RECIPE_FILE
    recipe = _read_recipe(recipe_path)
    weights_path = folder / recipe["weights"]["file"]
    try:
        data = weights_path.read_bytes()
    except OSError as error:
        raise RecipeError(f"{weights_path}: cannot read the weights: {error.strerror or error}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != recipe["weights"]["sha256"]:
        raise RecipeError(
            f"{weights_path}: sha256 {digest[:12]}… is not the {recipe['weights']['sha256'][:12]}… that "
            f"{RECIPE_FILE} records: the file is corrupted, truncated or from another save"
        )
    try:
        tensors = _safetensors().load(data)
    except Exception as error:  # noqa: BLE001 - safetensors' own error types differ between versions
        raise RecipeError(f"{weights_path}: not a safetensors file: {' '.join(str(error).split())}") from None

    base = base_model if base_model is not None else _base_model(recipe, recipe_path)
    rules = parse_rules(recipe["rules"]["toml"], f"{recipe_path} (rules {recipe['rules']['name']!r})")
    example = torch.zeros(recipe["input_shape"])
    rebuilt_plan = make_plan(base, rules, example, scope=recipe["scope"])
    _check_figures(rebuilt_plan, recipe, recipe_path, given=base_model is not None)
    model = rebuilt_plan.apply()
    _load_state(model, tensors, weights_path)
    return model.eval()


# Writing


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors takes it: on the CPU, contiguous, no two entries sharing memory."""
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise RecipeError(
                f"{key} has no data (meta device): save the result of a plan made on a model with real weights"
            )
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel():
            tensor = tensor.clone()  # tied weights: safetensors refuses shared memory; loading ties nothing
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor
    return state


def _figures(plan: Any) -> dict[str, Any]:
    return {
        "params_before": plan.params.before,
        "params_after": plan.params.after,
        "flops_before": plan.flops.before,
        "flops_after": plan.flops.after,
        "sites": [site.path for site in plan.sites],
    }


def _absolute_spec(spec: str) -> str:
    """A ``file.py:callable`` spec with its path made absolute, so that loading works from any folder."""
    target, sep, attribute = spec.rpartition(":")
    if sep and (target.endswith(".py") or "/" in target or os.sep in target):
        return f"{Path(target).resolve()}:{attribute}"
    return spec


# Reading


def _read_recipe(path: Path) -> dict[str, Any]:
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(
            f"{path}: no such file; is this a folder written by rewrite.save / rewrite apply?"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read it: {error}") from None
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise RecipeError(f'{path}: not a rewrite recipe (no "format": "{FORMAT}")')
    version = recipe.get("format_version")
    if version != FORMAT_VERSION:
        raise RecipeError(
            f"{path}: format version {version!r}; this rewrite ({_library_version()}) reads version "
            f"{FORMAT_VERSION} (recipe written by rewrite {recipe.get('library_version', '?')})"
        )
    missing, extra = sorted(_KEYS - set(recipe)), sorted(set(recipe) - _KEYS)
    if missing or extra:
        what = "; ".join(
            part
            for part in (
                f"missing key(s) {', '.join(missing)}" if missing else "",
                f"unknown key(s) {', '.join(extra)}" if extra else "",
            )
            if part
        )
        raise RecipeError(f"{path}: {what}")
    _expect(path, recipe, "rules", dict, ("name", "toml"))
    _expect(path, recipe, "weights", dict, ("file", "sha256"))
    _expect(path, recipe, "plan", dict, ("params_before", "params_after", "flops_after", "sites"))
    if recipe["model"] is not None:
        _expect(path, recipe, "model", dict, ("spec", "args"))
    shape = recipe["input_shape"]
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)):
        raise RecipeError(f"{path}: input_shape must be a list of positive integers, got {shape!r}")
    if Path(recipe["weights"]["file"]).name != recipe["weights"]["file"]:
        raise RecipeError(f"{path}: weights.file must be a file name in the recipe's folder")
    return recipe


def _expect(path: Path, recipe: dict, key: str, kind: type, keys: tuple[str, ...]) -> None:
    value = recipe[key]
    if not isinstance(value, kind) or any(k not in value for k in keys):
        raise RecipeError(f"{path}: {key} must be an object with {', '.join(keys)}, got {value!r}"[:300])


def _base_model(recipe: dict[str, Any], path: Path) -> nn.Module:
    from rewrite.model_spec import load_model

    if recipe["model"] is None:
        raise RecipeError(
            f"{path}: records no model spec (it was saved from Python for a model of your own): "
            "pass that model as rewrite.load(directory, base_model=...)"
        )
    return load_model(recipe["model"]["spec"], recipe["model"]["args"])


def _check_figures(plan: Any, recipe: dict[str, Any], path: Path, *, given: bool) -> None:
    recorded, now = recipe["plan"], _figures(plan)
    for key in ("sites", "params_before", "params_after", "flops_after"):
        if now[key] != recorded[key]:
            hint = (
                "is base_model the architecture the rewrite was saved from?"
                if given
                else "the model's code or the library changed since it was saved"
            )
            raise RecipeError(
                f"{path}: the rewrite rebuilt from the recipe differs from the saved one ({key} "
                f"{_short(now[key])} now, {_short(recorded[key])} recorded); {hint}"
            )


def _load_state(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing, extra = [k for k in expected if k not in tensors], [k for k in tensors if k not in expected]
    if missing:
        raise RecipeError(f"{path}: missing {_count(missing, 'key')} the model has: {_names(missing)}")
    if extra:
        raise RecipeError(f"{path}: {_count(extra, 'key')} the model does not have: {_names(extra)}")
    for key, tensor in tensors.items():
        want = expected[key]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise RecipeError(
                f"{path}: {key} is {tuple(tensor.shape)} {tensor.dtype}, the model needs "
                f"{tuple(want.shape)} {want.dtype}"
            )
    model.load_state_dict(tensors, strict=True)


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise RecipeError(
            "saving and loading rewrites needs safetensors: pip install 'fx-rewrite[deploy]'"
        ) from None
    return safetensors.torch


def _library_version() -> str:
    from rewrite import __version__

    return f"version {__version__}"


def _count(keys: list[str], noun: str) -> str:
    return f"{len(keys)} {noun}" + ("" if len(keys) == 1 else "s")


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"
