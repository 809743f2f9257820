import pytest

import rewrite.builders


@pytest.fixture(autouse=True)
def scratch_builder_registry(monkeypatch):
    """Builders a test registers are gone after it, so no test sees another's."""
    monkeypatch.setattr(rewrite.builders, "_REGISTRY", dict(rewrite.builders._REGISTRY))
