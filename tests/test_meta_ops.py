"""rewrite.meta_ops: each op of a meta run worked out once per signature, and made again alike."""

from __future__ import annotations

import torch
from torch import nn

from rewrite.execution import run
from rewrite.meta_ops import MetaOpMemo


class Mixed(nn.Module):
    """Ops of every kind a memo must tell apart: fresh outputs (conv, BatchNorm, cat), views, in-place ops, a
    channels-last layout and a factory op."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.norm(self.conv(x.contiguous(memory_format=torch.channels_last)))
        a, b = y.chunk(2, dim=1)
        a = a.add_(1)  # the chunk itself, a view
        z = torch.cat([b, a], dim=1).transpose(2, 3)
        return z, a, torch.zeros(3, device=x.device), y.sum((2, 3))


def test_a_memoized_meta_run_gives_what_an_unmemoized_one_gives() -> None:
    """Each op of a meta run is worked out once per signature (rewrite.meta_ops.MetaOpMemo); what the memo
    makes again must match, layout included, and views and in-place results must still alias their input."""

    def layouts(outputs: tuple[torch.Tensor, ...]) -> list[tuple]:
        return [(t.shape, t.stride(), t.dtype, t.storage_offset(), t._base is not None) for t in outputs]

    model = nn.Sequential(Mixed()).to("meta").train()
    x = torch.empty(2, 4, 6, 5, device="meta")
    with torch.no_grad():
        expected = layouts(model(x))
    with torch.no_grad(), MetaOpMemo():
        first = model(x)
        again = model(torch.empty(2, 4, 6, 5, device="meta"))
    assert layouts(first) == layouts(again) == expected
    assert again[0] is not first[0]
    assert run(model, (x,)).value[0].stride() == first[0].stride()  # the runner's meta runs use the memo
