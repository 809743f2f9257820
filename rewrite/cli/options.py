"""The values the ``rewrite`` command's options take: each parsed (or refused, with a one-line message) before
any work is done."""

from __future__ import annotations

import argparse
import math
import re

from rewrite.errors import InputSpecError
from rewrite.report import FORMATS

DEFAULT_INPUT = "1,3,640,640"
DEFAULT_TOLERANCE = 1e-4


class UsageError(Exception):
    """A command line that argparse (or an option check) turned down."""


def parse_input_shape(text: str) -> tuple[int, ...]:
    """The ``--input`` shape: comma-separated positive integers.

    >>> parse_input_shape("1,3,640,640")
    (1, 3, 640, 640)
    >>> parse_input_shape("1,3,x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    rewrite.errors.InputSpecError: --input '1,3,x': expected comma-separated positive integers such as ...
    """
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isascii() and part.isdigit() and int(part) > 0 for part in parts):
        raise InputSpecError(
            f"--input {text!r}: expected comma-separated positive integers such as {DEFAULT_INPUT}"
        )
    shape = tuple(int(part) for part in parts)
    # torch counts elements in 64-bit integers; a larger tensor cannot even be described on meta.
    if math.prod(shape) > _MAX_ELEMENTS:
        raise InputSpecError(
            f"--input {text!r}: {math.prod(shape):.3g} elements, more than a tensor can hold (at most "
            f"{_MAX_ELEMENTS:.3g}); use a shape such as {DEFAULT_INPUT}"
        )
    return shape


_MAX_ELEMENTS = 2**63 - 1


def parse_model_arg(text: str) -> tuple[str, object]:
    """A ``--model-arg KEY=VALUE``; the value becomes an int, float, bool or None when it looks like one.

    >>> [parse_model_arg(t) for t in ("nc=3", "width=0.5", "pretrained=false", "cfg=None", "name=v5")]
    [('nc', 3), ('width', 0.5), ('pretrained', False), ('cfg', None), ('name', 'v5')]
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a Python identifier, got {text!r}")
    return key.strip(), _literal(value)


def _literal(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        # "nan" and "inf" stay text: nobody means them as numbers here.
        if kind is int or math.isfinite(value):
            return value
    return text


_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_formats(text: str) -> tuple[str, ...]:
    """One report format, or several separated by commas (each written once, in the order given).

    >>> parse_formats("html"), parse_formats("markdown, html,json,html")
    (('html',), ('markdown', 'html', 'json'))
    >>> parse_formats("pdf")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: unknown report format 'pdf'; expected text, markdown, json or html
    """
    formats = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    for fmt in formats:
        if fmt not in FORMATS:
            raise argparse.ArgumentTypeError(
                f"unknown report format {fmt!r}; expected {', '.join(FORMATS[:-1])} or {FORMATS[-1]}"
            )
    return formats


def parse_count(text: str) -> int:
    """A params or FLOPs threshold, with an optional K / M / G / T suffix (powers of 1000).

    >>> parse_count("100G"), parse_count("46.5M"), parse_count("1_000")
    (100000000000, 46500000, 1000)
    """
    match = re.fullmatch(
        r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)\s*", text.replace("_", "").replace(",", ""), re.IGNORECASE
    )
    value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()] if match else math.nan
    if not math.isfinite(value):  # not a count, or too many digits for a float
        raise argparse.ArgumentTypeError(f"expected a count such as 40M or 100G, got {text!r}")
    return round(value)


def train_option(text: str) -> tuple[str, object]:
    """A ``rewrite train`` KEY=VALUE for ultralytics, or a usage error (an unknown option, say)."""
    try:
        return parse_model_arg(text)
    except argparse.ArgumentTypeError as error:
        raise UsageError(
            f"rewrite train: unrecognized argument {text!r}: {error} (see 'rewrite train --help')"
        )


def parse_seconds(text: str) -> float:
    """A ``--warm-start`` budget: a positive number of seconds.

    >>> parse_seconds("45"), parse_seconds("2.5")
    (45.0, 2.5)
    """
    value = _literal(text)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds such as 30, got {text!r}")
    return float(value)


def parse_percent(text: str) -> float:
    """A reduction threshold in percent, from 0 to 100 (more could never pass); a trailing ``%`` is allowed.

    >>> parse_percent("10"), parse_percent("12.5%")
    (10.0, 12.5)
    >>> parse_percent("150")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: expected a percentage from 0 to 100 such as 10 or 12.5, got '150'
    """
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"expected a percentage from 0 to 100 such as 10 or 12.5, got {text!r}"
        )
    return value
