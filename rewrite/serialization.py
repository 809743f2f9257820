"""Save a rewritten model and load it back, without pickles.

A saved rewrite is a folder with two files:

* ``recipe.json`` — how to rebuild the architecture: the format version, the library version, the model spec
  and its arguments (a zoo name, ``package.module:callable`` or ``file.py:callable``), the rule set's name and
  full TOML text, the scope, the input shape, the plan's figures, and the sha256 of the weights file;
* ``weights.safetensors`` — the rewritten model's ``state_dict`` (safetensors: tensors and nothing else).

:func:`load` rebuilds the base model from the spec (or takes the ``base_model`` you pass for an architecture of
your own), redoes the same rewrite, checks that it gives the recorded figures, verifies the checksum and loads
the weights strictly. Nothing on that path unpickles anything, and a folder from someone else is safe to open:
unless you pass ``trust_model_code=True``, the only model specs a recipe may name are the zoo's, so loading
imports and runs no code the folder names (a recipe naming ``package.module:callable`` or ``file.py:callable``
is refused before anything is imported). Nothing is allocated blindly either: a zoo model is first built on the
meta device and refused when it is far larger than the weights file, an input shape when its example input is
larger than this machine's memory.

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

A recipe whose spec names code is refused unless you trust its author:

>>> recipe = json.loads((folder / "recipe.json").read_text())
>>> recipe["model"]["spec"] = "os:system"
>>> _ = (folder / "recipe.json").write_text(json.dumps(recipe))
>>> load(folder)  # doctest: +ELLIPSIS
Traceback (most recent call last):
rewrite.errors.RecipeError: .../recipe.json: model spec 'os:system' names code to import and run; ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewrite.errors import RecipeError, RewriteError, one_line
from rewrite.execution import physical_memory
from rewrite.files import write_atomically

__all__ = ["FORMAT_VERSION", "RECIPE_FILE", "WEIGHTS_FILE", "load", "recipe_files", "save"]

FORMAT = "rewrite-recipe"
FORMAT_VERSION = 1
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "weights.safetensors"


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


def load(
    directory: str | os.PathLike[str], base_model: nn.Module | None = None, *, trust_model_code: bool = False
) -> nn.Module:
    """The rewritten model saved in ``directory`` (in eval mode): rebuilt from its recipe, weights loaded strictly.

    ``base_model`` is the model the rewrite was made from, for an architecture that the recipe records no spec
    for (it is not modified); without it the recipe's spec builds one. Only a zoo name is built unless
    ``trust_model_code`` is true: a spec that names code (``package.module:callable``, ``file.py:callable``)
    would import and run it, so it is refused before anything is imported; pass ``base_model`` instead, or
    trust the folder's author. Anything wrong with the folder — a missing file, another format version, missing
    or extra keys, a value of the wrong type, wrong shapes, a corrupted or truncated weights file, a model or
    input larger than the weights file and this machine's memory allow, a rewrite that no longer gives the
    recorded figures — raises :class:`~rewrite.errors.RecipeError` naming the file and what is wrong.
    """
    from rewrite.model_spec import build_model, model_factory
    from rewrite.planner import plan as make_plan
    from rewrite.rules import parse_rules

    folder = Path(directory)
    recipe_path = folder / RECIPE_FILE
    recipe = _read_recipe(recipe_path)
    if base_model is None:
        _check_spec(recipe, recipe_path, trusted=trust_model_code)  # before anything is imported
    weights_path, tensors = _read_weights(folder, recipe)
    with _as_recipe_error(recipe_path):
        rules = parse_rules(
            recipe["rules"]["toml"], f"{recipe_path} (rules {_short(recipe['rules']['name'])})"
        )
        base = base_model
        if base is None:
            spec, arguments = recipe["model"]["spec"], recipe["model"]["args"]
            factory = model_factory(spec)
            if spec in _zoo_names():
                _check_model_size(factory, recipe, recipe_path, _size(tensors.values()))
            base = build_model(spec, factory, arguments, "cpu")
        rebuilt_plan = make_plan(base, rules, torch.zeros(recipe["input_shape"]), scope=recipe["scope"])
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

# A recipe is a few kilobytes (the rule file's text is the bulk): a larger file is not one, and is not read.
_MAX_RECIPE_BYTES = 16 * 2**20
# Every object in a recipe, by where it is, with its keys and the type of each value (int never takes a bool).
_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "": {
        "format": (str,),
        "format_version": (int,),
        "library_version": (str,),
        "model": (dict, type(None)),
        "rules": (dict,),
        "scope": (str, list, type(None)),
        "input_shape": (list,),
        "plan": (dict,),
        "weights": (dict,),
    },
    "model": {"spec": (str,), "args": (dict,)},
    "rules": {"name": (str,), "toml": (str,)},
    "plan": {
        "params_before": (int,),
        "params_after": (int,),
        "flops_before": (int,),
        "flops_after": (int,),
        "sites": (list,),
    },
    "weights": {"file": (str,), "sha256": (str,), "tensors": (int,)},
}
_TYPE_NAMES = {str: "text", int: "an integer", dict: "an object", list: "a list", type(None): "null"}


def _read_recipe(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RecipeError(f"{path}: no such file; is this a folder written by rewrite.save / rewrite apply?")
    recipe = _decode(path, _read_file(path, "the recipe", limit=_MAX_RECIPE_BYTES))
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise RecipeError(f'{path}: not a rewrite recipe (no "format": "{FORMAT}")')
    version = recipe.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise RecipeError(
            f"{path}: format version {_short(version)}; this rewrite ({_library_version()}) reads version "
            f"{FORMAT_VERSION} (recipe written by rewrite {_clip(str(recipe.get('library_version', '?')))})"
        )
    for where, fields in _SCHEMA.items():
        value = recipe[where] if where else recipe
        if value is not None:
            _check_object(path, where, value, fields)
    scope = recipe["scope"]
    if isinstance(scope, list) and not (scope and all(isinstance(part, str) for part in scope)):
        raise RecipeError(
            f"{path}: scope must be null, text or a non-empty list of text, got {_short(scope)}"
        )
    if not all(isinstance(site, str) for site in recipe["plan"]["sites"]):
        raise RecipeError(
            f"{path}: plan.sites must be a list of module paths, got {_short(recipe['plan']['sites'])}"
        )
    if not re.fullmatch(r"[0-9a-f]{64}", recipe["weights"]["sha256"]):
        raise RecipeError(
            f"{path}: weights.sha256 must be 64 lowercase hex digits, got {_short(recipe['weights']['sha256'])}"
        )
    file = recipe["weights"]["file"]
    if not file or Path(file).name != file:  # no folder part: not absolute, no "..", nothing outside
        raise RecipeError(
            f"{path}: weights.file must be a file name in the recipe's folder, got {_short(file)}"
        )
    _check_input_shape(path, recipe["input_shape"])
    return recipe


def _read_file(path: Path, what: str, *, limit: int | None = None) -> bytes:
    """The bytes of ``path``, a regular file (not a device or pipe a read would never finish), at most ``limit``."""
    try:
        if path.exists() and not path.is_file():
            raise RecipeError(f"{path}: cannot read {what}: not a regular file")
        if limit is not None and path.stat().st_size > limit:
            raise RecipeError(
                f"{path}: {path.stat().st_size:,} bytes, more than a recipe ever holds ({limit:,}); it is not one"
            )
        return path.read_bytes()
    except OSError as error:
        raise RecipeError(f"{path}: cannot read {what}: {error.strerror or error}") from None


def _decode(path: Path, data: bytes) -> Any:
    """``recipe.json`` parsed as strict JSON: UTF-8, no duplicate keys, no NaN or Infinity, numbers that fit."""
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
            parse_float=_finite,
            parse_int=_integer,
        )
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text: {error}") from None
    except RecursionError:  # the decoder recurses into nested lists and objects
        raise RecipeError(
            f"{path}: not valid JSON: lists or objects nested too deeply to read; a recipe nests three levels"
        ) from None
    except ValueError as error:  # JSONDecodeError, the hooks' refusals, an integer with too many digits
        raise RecipeError(f"{path}: not valid JSON: {_clip(str(error), 200)}") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {twice!r} appears twice in one object")
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise ValueError(
            f"an integer of {len(text.lstrip('-')):,} digits; no figure in a recipe has more than {_MAX_DIGITS}"
        )
    return int(text)


_MAX_DIGITS = 40  # FLOPs and params fit in 20


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{_clip(text, 40)} is too large for a number")
    return value


def _check_object(path: Path, where: str, value: dict[str, Any], fields: dict[str, tuple[type, ...]]) -> None:
    """``value`` has exactly the keys of ``fields``, each of its type."""
    missing, extra = sorted(set(fields) - set(value)), sorted(set(value) - set(fields))
    at = f" in {where}" if where else ""
    if missing or extra:
        what = "; ".join(
            part
            for part in (
                f"missing key(s) {', '.join(missing)}{at}" if missing else "",
                f"unknown key(s) {_clip(', '.join(extra))}{at}" if extra else "",
            )
            if part
        )
        raise RecipeError(f"{path}: {what}")
    for key, kinds in fields.items():
        item = value[key]
        if not isinstance(item, kinds) or (isinstance(item, bool) and bool not in kinds):
            wanted = " or ".join(_TYPE_NAMES[kind] for kind in kinds)
            raise RecipeError(
                f"{path}: {where + '.' if where else ''}{key} must be {wanted}, got {_short(item)}"
            )


def _check_input_shape(path: Path, shape: list[Any]) -> None:
    """Positive integers, and an example input that this machine can hold (checked before it is made)."""
    if not (shape and all(type(size) is int and size > 0 for size in shape)):
        raise RecipeError(f"{path}: input_shape must be a list of positive integers, got {_short(shape)}")
    size = math.prod(shape) * torch.get_default_dtype().itemsize
    memory = physical_memory()
    if size > (memory if memory is not None else _MAX_TENSOR_BYTES):
        raise RecipeError(
            f"{path}: input_shape {_short(shape)} needs {size / 1e9:,.3g} GB for the example input alone, more "
            "than this machine has; a recipe records the shape its plan was made on, so this one is damaged or "
            "was not written by rewrite.save"
        )


_MAX_TENSOR_BYTES = 2**63 - 1  # torch counts in 64-bit integers


def _check_spec(recipe: dict[str, Any], path: Path, *, trusted: bool) -> None:
    """Refuse a spec that names code, unless its author is trusted: checked before anything is imported."""
    if recipe["model"] is None:
        raise RecipeError(
            f"{path}: records no model spec (it was saved from Python for a model of your own): "
            "pass that model as rewrite.load(directory, base_model=...)"
        )
    spec = recipe["model"]["spec"]
    if trusted or spec in _zoo_names():
        return
    if ":" in spec or spec.endswith(".py"):
        raise RecipeError(
            f"{path}: model spec {_short(spec, 300)} names code to import and run; a recipe is data, and only the "
            "zoo's models are built from it unless you trust its author: build the model yourself and pass it "
            "as rewrite.load(directory, base_model=...), or, if you trust whoever wrote this folder, "
            "rewrite.load(directory, trust_model_code=True) (rewrite export --trust-model-code)"
        )
    raise RecipeError(
        f"{path}: model spec {_short(spec, 300)} is not a zoo model ({', '.join(_zoo_names())})"
    )


def _zoo_names() -> list[str]:
    from rewrite.zoo import list_models

    return list_models()


def _check_model_size(factory: Any, recipe: dict[str, Any], path: Path, weights: int) -> None:
    """Build the zoo model on the meta device, where nothing is allocated, and refuse it when it holds far more
    than the ``weights`` bytes of the tensors it is to be loaded with: its args were not the saved model's."""
    from rewrite.model_spec import build_model

    spec, arguments = recipe["model"]["spec"], recipe["model"]["args"]
    try:
        model = build_model(spec, factory, arguments, "meta")
    except (TypeError, ValueError, OverflowError, RuntimeError) as error:
        # Arguments the builder does not check itself (a width too large for torch's integers).
        raise RecipeError(
            f"{path}: model {spec!r} cannot be built with args {_short(arguments)}: {one_line(error)}"
        ) from None
    size = _size(model.state_dict().values())
    if size > _MAX_SHRINK * weights + _SLACK_BYTES:
        raise RecipeError(
            f"{path}: model {spec!r} with args {_short(arguments)} holds {_bytes(size)} of weights, and "
            f"the weights file {_bytes(weights)}; a rewrite does not shrink a model that much, so these "
            "args are not the saved model's"
        )


# How much smaller than its base a rewritten model may be before a recipe's zoo model is refused unbuilt: a
# rewrite replaces blocks with cheaper ones of the same widths (a GSConv has about half a conv's weights).
_MAX_SHRINK = 4
_SLACK_BYTES = 64 * 2**20


def _size(tensors: Iterable[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _read_weights(folder: Path, recipe: dict[str, Any]) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file the recipe names (in the folder, symbolic links resolved), checksum verified, parsed."""
    path = folder / recipe["weights"]["file"]
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except OSError as error:  # a loop of symbolic links
        raise RecipeError(f"{path}: cannot read the weights: {error.strerror or error}") from None
    if not inside:
        raise RecipeError(f"{path}: a link to a file outside the recipe's folder; the weights must be in it")
    data = _read_file(path, "the weights")
    digest = hashlib.sha256(data).hexdigest()
    if digest != recipe["weights"]["sha256"]:
        raise RecipeError(
            f"{path}: sha256 {digest[:12]}… is not the {recipe['weights']['sha256'][:12]}… that "
            f"{RECIPE_FILE} records: the file is corrupted, truncated or from another save"
        )
    try:
        tensors = _safetensors().load(data)
    except Exception as error:  # noqa: BLE001 - safetensors' own error types differ between versions
        raise RecipeError(f"{path}: not a safetensors file: {' '.join(str(error).split())}") from None
    return path, tensors


@contextlib.contextmanager
def _as_recipe_error(path: Path) -> Iterator[None]:
    """The library's own errors while redoing the rewrite (bad rules, a scope that matches nothing, a model
    that cannot be found or traced) are the recipe's fault: one line naming it."""
    try:
        yield
    except RecipeError:
        raise
    except RewriteError as error:
        message = " ".join(str(error).split())
        # The rules' errors name the recipe already (it is their source).
        message = message if message.startswith(str(path)) else f"{path}: {message}"
        raise RecipeError(_clip(message, 1000)) from None


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
    return _clip(", ".join(keys[:3]), 300) + (", …" if len(keys) > 3 else "")


def _short(value: Any, limit: int = 80) -> str:
    return _clip(repr(value), limit)


def _bytes(size: int) -> str:
    return f"{size / 1e9:,.3g} GB" if size >= 1e9 else f"{size / 1e6:,.3g} MB"


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
