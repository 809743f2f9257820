"""The networkx view of a traced model, and where its stages (backbone / neck / head) and scopes lie."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("backbone", "neck", "head")


@dataclass(frozen=True)
class StageMap:
    """Which stage each module belongs to, by module-path prefix.

    ``prefixes`` maps a module path (``"model.10"``, ``"backbone.fpn"``) to a stage name; a module belongs to the
    stage of the longest prefix that is itself or one of its ancestors.

    >>> stages = StageMap({"model.0": "backbone", "model.10": "neck"}, source="config", explanation="...")
    >>> stages.stage_of("model.10.conv"), stages.stage_of("model.1"), stages.stage_of("model.0.bn")
    ('neck', None, 'backbone')
    """

    prefixes: dict[str, str] = field(default_factory=dict)
    source: str = "none"
    explanation: str = ""

    def stage_of(self, path: str) -> str | None:
        probe = path
        while True:
            if probe in self.prefixes:
                return self.prefixes[probe]
            if not probe:
                return None
            probe = probe.rpartition(".")[0]
