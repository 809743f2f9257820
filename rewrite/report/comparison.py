"""The figures of two detectors measured side by side: what a comparison report shows.

:func:`rewrite.integrations.ultralytics.compare` measures them (it needs ultralytics); rendering needs only
these fields, so the report is importable without the extra.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Comparison", "Measurement"]


@dataclass(frozen=True)
class Measurement:
    """One detector as it was measured: its size and cost, its speed, and its accuracy."""

    name: str  # the checkpoint's path, or the model's class name
    params: int
    flops: int  # per image of imgsz × imgsz, as rewrite.profile counts them
    latency_ms: float  # median forward pass at batch 1, BatchNorm folded (rewrite.fold), eval mode
    map50: float  # box mAP at IoU 0.5, on the data's validation split
    map50_95: float  # box mAP averaged over IoU 0.5 to 0.95


@dataclass(frozen=True)
class Comparison:
    """Two detectors measured side by side; ``str()`` is the text table, :meth:`render` any format."""

    base: Measurement
    slim: Measurement
    data: str
    imgsz: int
    device: str

    def render(self, fmt: str = "text") -> str:
        """The table as ``fmt``: "text", "markdown" or "html" (one page), like a plan's report."""
        from rewrite.report import render_comparison  # the package renders; this module only holds figures

        return render_comparison(self, fmt)

    def __str__(self) -> str:
        return self.render("text")
