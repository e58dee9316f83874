"""Contiguous min-max partition of L identical layers over N stages in a fixed order (exact, by counts).

Stage j holding n layers costs fixed_j + n·per_layer_j and can hold at most cap_j layers; every stage
holds at least one. The optimal bottleneck is one of the values fixed_j + n·per_layer_j, so a binary
search over those candidates with the greedy capacity test Σ_j min(cap_j, ⌊(β − fixed_j)/per_layer_j⌋) ≥ L
finds it exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _fill(fixed: np.ndarray, per: np.ndarray, cap: np.ndarray, beta: float) -> np.ndarray:
    room = np.floor((beta - fixed) / np.where(per > 0, per, 1.0) + 1e-9)
    room = np.where(per > 0, room, np.where(beta >= fixed, cap, 0))
    return np.clip(room, 0, cap).astype(int)


def min_max_counts(fixed: Sequence[float], per_layer: Sequence[float], cap: Sequence[int],
                   layers: int) -> tuple[int, ...] | None:
    """Layer counts (n_j ≥ 1, n_j ≤ cap_j, Σ n_j = L) minimising max_j fixed_j + n_j·per_layer_j; None if none fit.

    Surplus layers at the optimal bottleneck are removed from the last stages first (deterministic).
    """
    f, t, c = np.asarray(fixed, float), np.asarray(per_layer, float), np.asarray(cap, int)
    n = len(f)
    if n > layers or (c < 1).any() or c.sum() < layers:
        return None
    cand = np.unique((f[:, None] + t[:, None] * np.arange(1, layers + 1)[None, :]).ravel())
    floor = float((f + t).max())
    cand = cand[cand >= floor]
    lo, hi = 0, len(cand) - 1
    if _fill(f, t, c, cand[hi]).sum() < layers:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        counts = _fill(f, t, c, cand[mid])
        if (counts >= 1).all() and counts.sum() >= layers:
            hi = mid
        else:
            lo = mid + 1
    counts = _fill(f, t, c, cand[lo])
    surplus = int(counts.sum()) - layers
    for j in range(n - 1, -1, -1):
        take = min(surplus, counts[j] - 1)
        counts[j] -= take
        surplus -= take
    return tuple(int(x) for x in counts)


def even_counts(layers: int, stages: int) -> tuple[int, ...]:
    """An even split: ⌊L/N⌋ each, the first L mod N stages one more."""
    return tuple(layers // stages + (1 if j < layers % stages else 0) for j in range(stages))
