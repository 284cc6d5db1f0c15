"""Token sequences of different lengths as one padded batch: the one padding helper."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_ids(
    seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (N, longest) long tensors; mask is 1 on real tokens.

    Prompts are padded on the left, so that every row's next token goes in the same column; outputs
    on the right, so that position i is token i. An all-empty batch still has one (padding) column.
    """
    width = max(1, max((len(s) for s in seqs), default=0))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)
