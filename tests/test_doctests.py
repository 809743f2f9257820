"""Every worked example in the library's docstrings runs and says what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import rewrite

MODULES = ["rewrite"] + [
    f"rewrite.{info.name}" for info in pkgutil.iter_modules(rewrite.__path__) if info.name != "__main__"
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
