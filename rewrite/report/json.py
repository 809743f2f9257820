"""A report as JSON, for machines: the rows' figures of the same document, in the versioned schema of
``docs/report-schema.md``."""

from __future__ import annotations

import json
from typing import Any

from rewrite.report.document import Document

# Bump on any change that can break a consumer (a key removed, renamed or changing meaning), not for new keys.
JSON_SCHEMA_VERSION = 1


def render_json(doc: Document) -> str:
    """The document's keyed facts and sections, in its ``json_order`` (else as they come), counts exact and
    every other number rounded to 4 decimals, so float noise never shows up in a diff of two reports."""
    parts = {fact.key: fact.data for fact in doc.facts if fact.key is not None}
    parts |= {section.key: section.data() for section in doc.sections if section.key is not None}
    order = doc.json_order or tuple(parts)
    assert set(parts) <= set(order), (
        f"the {doc.report} report's JSON order leaves out {set(parts) - set(order)}"
    )
    data = {"schema_version": JSON_SCHEMA_VERSION, "report": doc.report}
    data |= {key: _rounded(parts[key]) for key in order if key in parts}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _rounded(value: Any) -> Any:
    """``value`` with its floats rounded to 4 decimals, through dicts, lists and tuples.

    >>> _rounded({"percent": -14.184712, "after": 39_958_781, "shape": (1, 3), "ok": True})
    {'percent': -14.1847, 'after': 39958781, 'shape': [1, 3], 'ok': True}
    """
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    return value
