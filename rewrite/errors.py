"""One exception type per failure family.

Every error's message is one line that names what was wrong (file, rule, key, module or option) and what to do
about it, so the CLI can print ``str(error)`` and nothing else.
"""

from __future__ import annotations

import functools
import os
import traceback

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
    "one_line",
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


def one_line(error: BaseException) -> str:
    """``Type: first sentence of the message (file:line)``, the line being the model's own innermost one.

    torch's messages go on with advice and context that do not fit on one line (nor apply to meta stand-ins).
    The line is that of the innermost frame outside torch and outside this library's tracing and running code.

    >>> def forward(x):
    ...     raise ValueError("expected 3 channels. Got 4.")
    >>> try:
    ...     forward(None)
    ... except ValueError as error:
    ...     print(one_line(error))  # doctest: +ELLIPSIS
    ValueError: expected 3 channels (<doctest ...one_line[0]>:2)
    """
    lines = str(error).strip().splitlines()
    message = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if len(message) > 160:
        message = message[:157] + "..."
    where = ""
    for frame, line in traceback.walk_tb(error.__traceback__):  # outermost first: the last kept is innermost
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_torch_dir()) and filename not in _DRIVER_FILES:
            where = f" ({os.path.basename(filename)}:{line})"
    return f"{type(error).__name__}: {message}{where}" if message else f"{type(error).__name__}{where}"


# The frames one_line looks past to find the model's own line: torch's, and those of this library's modules
# that trace, run or count a model (errors pass through them on their way up).
_DRIVER_FILES = frozenset(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    for name in ("execution", "meta_ops", "region", "tracer", "profiler")
)


@functools.cache
def _torch_dir() -> str:
    import torch  # an error from torch's frames means torch is loaded; this module itself needs none of it

    return os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
