"""Fast plans without a MILP: one bit-width per stage, the bottleneck's busy time minimised by bisection + DP.

Busy time of stage j over the job (ms): K_p·t^p_j + K_d·Σ_k W_k·t^d_j(k), with W_k the surrogate's decode
weights (trapezoid cycle weights, plus 1 for the last round), so that Σ_k W_k = n − 1. For a target T,
a DP over stages in order finds the layer counts and per-stage bit-widths that keep every stage's busy
time ≤ T and its memory ≤ capacity with the least Σω (ω averaged per bit-width over layers; the exact
Σω is checked afterwards); bisection finds the least T whose DP meets the budget. Used by the
`heuristic` method (`search.heuristic_candidates`) and as a seed of `llmpq`'s search.
"""

from __future__ import annotations

import math

import numpy as np

from .tables import Assignment, ProblemTables, violations

BISECTION_STEPS = 30


def busy_tables(tb: ProblemTables) -> tuple[np.ndarray, np.ndarray]:
    """(fixed busy [N], busy per layer [N, C]) of the branch (per-layer items)."""
    weights = tb.cycle_weights.copy()
    if tb.points:
        weights[-1] += 1.0
    per = tb.k_p * tb.t_prefill[0] + tb.k_d * (tb.t_decode[0] * weights).sum(axis=-1)
    fixed = tb.k_p * tb.fixed_prefill + tb.k_d * tb.fixed_decode * float(weights.sum() if tb.points else 0.0)
    return fixed, per


def _dp(tb: ProblemTables, target: float, fixed: np.ndarray, per: np.ndarray, caps: np.ndarray,
        omega_c: np.ndarray) -> tuple[float, list[tuple[int, int]]] | None:
    """Least Σω̄ covering all layers with every stage's busy ≤ target; [(count, column)] per stage."""
    L, N, C = tb.n_items, tb.n_stages, tb.n_bits
    best = np.full(L + 1, math.inf)
    best[0] = 0.0
    choice: list[tuple[np.ndarray, np.ndarray]] = []
    for j in range(N):
        nxt = np.full(L + 1, math.inf)
        arg_n = np.zeros(L + 1, dtype=int)
        arg_c = np.zeros(L + 1, dtype=int)
        for c in range(C):
            if not tb.allowed[j, c]:
                continue
            room = (target - fixed[j]) / per[j, c] if per[j, c] > 0 else L
            n_max = int(min(caps[j, c], math.floor(room + 1e-9), L))
            for n in range(1, n_max + 1):
                value = np.full(L + 1, math.inf)
                value[n:] = best[: L + 1 - n] + n * omega_c[c]
                better = value < nxt
                nxt = np.where(better, value, nxt)
                arg_n = np.where(better, n, arg_n)
                arg_c = np.where(better, c, arg_c)
        choice.append((arg_n, arg_c))
        best = nxt
    if not math.isfinite(best[L]):
        return None
    plan, left = [], L
    for j in range(N - 1, -1, -1):
        n, c = int(choice[j][0][left]), int(choice[j][1][left])
        plan.append((n, c))
        left -= n
    return float(best[L]), plan[::-1]


def heuristic_assignment(tb: ProblemTables) -> Assignment | None:
    """The heuristic plan of one branch (module docstring), or None when it finds none within memory and budget."""
    if tb.n_items != int(tb.sizes.sum()) or tb.n_stages > tb.n_items:
        return None
    fixed, per = busy_tables(tb)
    room = (tb.capacity - tb.fixed_mem)[:, None] - tb.workspace  # one bit-width per stage: its kernel's workspace
    caps = np.where(tb.allowed, np.floor(np.maximum(room, 0.0) / tb.mem_bytes[0]), 0).astype(int)
    omega_c = tb.omega.mean(axis=0)
    valid = np.where(tb.allowed, per, np.inf)
    lo = float((fixed + valid.min(axis=1)).max())
    hi = float(fixed.max() + tb.n_items * np.where(tb.allowed, per, 0).max())

    def attempt(target: float) -> Assignment | None:
        found = _dp(tb, target, fixed, per, caps, omega_c)
        if found is None or found[0] > tb.budget * (1 + 1e-9) + 1e-12:
            return None
        stage, column = [], []
        for j, (n, c) in enumerate(found[1]):
            stage += [j] * n
            column += [c] * n
        a = Assignment(tuple(stage), tuple(column))
        return a if not violations(tb, a) else None

    best = attempt(hi)
    if best is None:
        return None
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        got = attempt(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
        if hi - lo <= 1e-4 * hi:
            break
    return best
