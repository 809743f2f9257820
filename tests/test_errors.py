"""rewrite.errors: one exception type per failure family, and any error said on one line."""

from __future__ import annotations

import pytest

from rewrite import errors
from rewrite.errors import RewriteError, one_line


@pytest.mark.parametrize("name", [name for name in errors.__all__ if name[0].isupper()])
def test_every_failure_family_is_a_rewrite_error_or_warning(name: str) -> None:
    family = getattr(errors, name)
    assert issubclass(family, (RewriteError, Warning))


def test_one_line_keeps_the_first_sentence_and_the_models_own_line() -> None:
    def forward() -> None:
        raise RuntimeError("shapes cannot be multiplied. Check the inputs.\nMore detail.")

    try:
        forward()
    except RuntimeError as error:
        reason = one_line(error)
    assert reason.startswith("RuntimeError: shapes cannot be multiplied (test_errors.py:")
    assert one_line(ValueError("x" * 200)) == f"ValueError: {'x' * 157}..."
    assert one_line(KeyError()) == "KeyError"
