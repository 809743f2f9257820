"""One exception type per failure family.

Every error's message is one line that names what was wrong (file, rule, key, module or option) and what to do
about it, so the CLI can print ``str(error)`` and nothing else.
"""

from __future__ import annotations

__all__ = [
    "BuildError",
    "ExportError",
    "InputSpecError",
    "ModelSpecError",
    "NoMatchError",
    "NoMatchWarning",
    "RecipeError",
    "RewriteError",
    "RuleError",
    "ScopeError",
    "ShapeCheckError",
    "TraceError",
]


class RewriteError(Exception):
    """Base class of every error this library raises on purpose."""


class RuleError(RewriteError):
    """A rule file or rule-set object is invalid: syntax, unknown key, wrong type, unknown builder/class/predicate."""


class TraceError(RewriteError):
    """The model cannot be run or traced on the example inputs at all."""


class ScopeError(RewriteError):
    """A scope (named stage, module path or glob) matches nothing or cannot be resolved."""


class BuildError(RewriteError):
    """A builder could not construct the replacement for a matched site."""


class ShapeCheckError(RewriteError):
    """The rewritten model's outputs differ in structure or shape from the original's."""


class ModelSpecError(RewriteError):
    """A model spec (zoo name, ``package.module:callable`` or ``file.py:callable``) cannot be loaded."""


class InputSpecError(RewriteError):
    """An input shape spec such as ``1,3,640,640`` is malformed."""


class NoMatchError(RewriteError):
    """A rule matched nothing and the caller asked for that to be an error."""


class NoMatchWarning(UserWarning):
    """A rule matched nothing (the default is to warn, not fail)."""


class RecipeError(RewriteError):
    """A saved rewrite (recipe.json and weights.safetensors) cannot be written, read or rebuilt as recorded."""


class ExportError(RewriteError):
    """A model cannot be exported to ONNX, or the exported file does not compute what the model does."""
