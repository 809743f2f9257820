"""Model specs: the names ``rewrite`` builds a model from, on the command line and in saved recipes.

A spec is a zoo name (``"yolov5n"``), ``"package.module:callable"`` or ``"path/to/file.py:callable"``; the
callable's keyword arguments come separately. Anything that stops the model from being found or built is a
:class:`~rewrite.errors.ModelSpecError` naming the spec.

>>> load_model("yolov5n", {"nc": 2}, device="meta").model[-1].nc
2
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewrite.errors import ModelSpecError

__all__ = ["build_model", "import_target", "load_model", "model_factory"]


def load_model(spec: str, kwargs: dict[str, object] | None = None, *, device: str = "cpu") -> nn.Module:
    """Build the model that ``spec`` names, in eval mode, with its parameters created on ``device``.

    ``spec`` is a zoo name (``"yolov5n"``), ``"package.module:callable"`` or ``"path/to/file.py:callable"``;
    ``kwargs`` go to the callable. On ``device="meta"`` no weight is allocated: the callable runs under
    ``with torch.device("meta")``. Anything that stops the model from being found or built from the spec
    raises :class:`~rewrite.errors.ModelSpecError`; an error raised by the user's own code while building is
    theirs and keeps its traceback.
    """
    return build_model(spec, model_factory(spec), kwargs or {}, device)


def build_model(spec: str, factory: Callable[..., Any], kwargs: dict[str, object], device: str) -> nn.Module:
    """Call ``factory`` with ``kwargs`` under ``torch.device(device)``; the model, in eval mode."""
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as error:
        raise ModelSpecError(f"{spec}: {error}; check --model-arg") from None
    except ValueError:  # no signature to check (some builtins): the call itself will tell
        pass
    with torch.device(device):
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def model_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names, imported (a zoo name gives ``create_model`` bound to it)."""
    # rpartition: a Windows path "C:\m.py:build" keeps its drive letter.
    target, sep, attribute = spec.rpartition(":")
    if not sep:
        if spec.endswith(".py"):
            raise ModelSpecError(f"model spec {spec!r} names a file but no callable; write {spec}:CALLABLE")
        from rewrite.zoo import create_model

        # An unknown name raises ModelSpecError, with suggestions.
        return functools.partial(create_model, spec)
    if not target or not attribute:
        raise ModelSpecError(
            f"model spec {spec!r}: expected a zoo name, package.module:callable or file.py:callable"
        )
    module = import_target(target, f"model spec {spec!r}", "model file")
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelSpecError(f"model spec {spec!r}: {target} has no callable named {attribute!r}")
    return factory


def import_target(target: str, what: str, file_label: str) -> Any:
    """The module ``target`` names: a file (``models/det.py``) or a dotted module name (``mypkg.models``).

    Error messages start with ``what`` (``model spec 'pkg.mod:build'``), or for a file with ``file_label`` and
    the path (``model file models/det.py``).
    """
    if target.endswith(".py") or "/" in target or os.sep in target:
        return _import_file(target, file_label)
    # The console script leaves the working directory off sys.path and `python -m` puts it on: agree.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except ImportError as error:
        raise ModelSpecError(f"{what}: cannot import {target}: {error}") from None


def _import_file(path_text: str, label: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        raise ModelSpecError(f"{label} {path_text} does not exist")
    # A private module name: a user file called e.g. "rewrite.py" or "torch.py" must not shadow the real ones.
    name = f"_rewrite_model_{path.stem}"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path.resolve()):
        return loaded  # named twice (--import and MODEL): running it again would register its builders twice
    module_spec = importlib.util.spec_from_file_location(name, path.resolve())
    if module_spec is None or module_spec.loader is None:
        raise ModelSpecError(f"{label} {path_text} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    # So that the file imports its neighbours, as `python file.py` would.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    except (ImportError, SyntaxError) as error:
        raise ModelSpecError(
            f"{label} {path_text} cannot be imported: {type(error).__name__}: {error}"
        ) from None
    return module
