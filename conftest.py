"""Fixtures for everything the suite collects: the tests in tests/ and the docstring examples in rewrite/."""

import pytest

import rewrite.builders


@pytest.fixture(autouse=True)
def scratch_builder_registry(monkeypatch):
    """Builders a test or a docstring example registers are gone after it, so no test sees another's."""
    monkeypatch.setattr(rewrite.builders, "_REGISTRY", dict(rewrite.builders._REGISTRY))
