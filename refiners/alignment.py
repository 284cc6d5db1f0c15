"""Monotone alignment of an output to a reference: the dynamic programme of the reference term."""

from __future__ import annotations

import numpy as np

# Moves of the programme: output t and reference j paired, output t unpaired, reference j unpaired.
_PAIR, _OUTPUT_GAP, _REFERENCE_GAP = 0, 1, 2


def align(costs: np.ndarray, gap: float) -> tuple[list[tuple[int, int]], int]:
    """The cheapest monotone alignment of n output positions to m reference positions.

    Args:
        costs: (n, m) cost of pairing output position t with reference position j.
        gap: cost of leaving a position of either side unpaired.

    Returns:
        the pairs (t, j) in order, and the number of unpaired positions. With 0/1 costs and a gap of 1
        the total cost is the Levenshtein distance.
    """
    n, m = costs.shape
    offsets = gap * np.arange(m + 1)
    previous = offsets.copy()
    moves = np.full((n + 1, m + 1), _REFERENCE_GAP, dtype=np.int8)
    for t in range(1, n + 1):
        up = previous + gap
        diagonal = np.full(m + 1, np.inf)
        diagonal[1:] = previous[:-1] + costs[t - 1]
        best = np.minimum(up, diagonal)
        # Reference positions left unpaired along the row: row[j] = min over k <= j of best[k] + gap (j - k).
        row = np.minimum.accumulate(best - offsets) + offsets
        moves[t] = np.where(row < best, _REFERENCE_GAP, np.where(diagonal <= up, _PAIR, _OUTPUT_GAP))
        previous = row
    pairs, unpaired, t, j = [], 0, n, m
    while t > 0 or j > 0:
        move = moves[t, j] if t > 0 else _REFERENCE_GAP
        if move == _PAIR:
            t, j = t - 1, j - 1
            pairs.append((t, j))
        elif move == _OUTPUT_GAP:
            t, unpaired = t - 1, unpaired + 1
        else:
            j, unpaired = j - 1, unpaired + 1
    return pairs[::-1], unpaired
