"""Closed-form makespan of the ring pipeline: prefill, decode rounds, throughput.

Stages j = 0..N-1 in pipeline order; link j carries a micro-batch from stage j to stage j+1, and the
last link is the return link from the last stage back to the first. All times are in ms and are the
times of one micro-batch of the phase. Symbols as in the design ("The cost model" -> "Pipeline time"):

- β = max_j max(t_j, c_j), the bottleneck resource (a stage or its outgoing link);
- R = Σ_j (t_j + c_j), one trip around the ring;
- K_p, K_d the prefill and decode micro-batch counts, n the generated tokens per sequence.

Every prefill micro-batch returns before the first decode round starts (a barrier), so
T = T_p + T_d. With constant times per phase these formulas equal a FIFO event simulation of the ring
(see `llmpq.costmodel.simulator`); with decode times that grow with the round they bound it from above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def _check_time(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class PhaseTimes:
    """Per-micro-batch times of one phase (or one decode round), in ms.

    `stage_ms[j]` is t_j, stage j's compute time; `comm_ms[j]` is c_j, the time of link j -> j+1,
    where the last entry is the return link from the last stage to the first.
    """

    stage_ms: tuple[float, ...]
    comm_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_ms", tuple(self.stage_ms))
        object.__setattr__(self, "comm_ms", tuple(self.comm_ms))
        if len(self.stage_ms) < 1:
            raise ValueError("a pipeline needs at least one stage")
        if len(self.comm_ms) != len(self.stage_ms):
            raise ValueError(
                f"comm_ms needs one entry per stage (the last is the return link): "
                f"{len(self.comm_ms)} links for {len(self.stage_ms)} stages"
            )
        for j, t in enumerate(self.stage_ms):
            _check_time(f"stage_ms[{j}]", t)
        for j, c in enumerate(self.comm_ms):
            _check_time(f"comm_ms[{j}]", c)

    @property
    def n_stages(self) -> int:
        return len(self.stage_ms)


@dataclass(frozen=True)
class PipelineTime:
    """Predicted time of one batch: T_p, T_d and T = T_p + T_d, in ms."""

    prefill_ms: float
    decode_ms: float
    total_ms: float


def bottleneck_ms(p: PhaseTimes) -> float:
    """β = max_j max(t_j, c_j): the slowest resource, stage or link (ms)."""
    return max(max(p.stage_ms), max(p.comm_ms))


def ring_trip_ms(p: PhaseTimes) -> float:
    """R = Σ_j (t_j + c_j): one micro-batch's trip around the ring, return link included (ms)."""
    return math.fsum(p.stage_ms) + math.fsum(p.comm_ms)


def pass_ms(p: PhaseTimes, k: int) -> float:
    """R + (K − 1)·β: K micro-batches entering back to back, until the last one returns (ms)."""
    _check_count("K", k)
    return ring_trip_ms(p) + (k - 1) * bottleneck_ms(p)


def cycle_ms(p: PhaseTimes, k_d: int) -> float:
    """cycle = max(K_d·β, R): a decode round that the next round must wait for (ms).

    Either the bottleneck resource serves all K_d micro-batches (K_d·β) or a micro-batch's own trip
    around the ring (R) is longer; the next round of a micro-batch cannot start before both.
    """
    _check_count("K_d", k_d)
    return max(k_d * bottleneck_ms(p), ring_trip_ms(p))


def prefill_ms(p: PhaseTimes, k_p: int) -> float:
    """T_p = R^p + (K_p − 1)·β^p: all K_p prefill micro-batches pass once and yield the first token (ms)."""
    _check_count("K_p", k_p)
    return pass_ms(p, k_p)


def _check_rounds(rounds: Sequence[PhaseTimes]) -> None:
    if any(not isinstance(r, PhaseTimes) for r in rounds):
        raise TypeError("rounds must be PhaseTimes")
    if len({r.n_stages for r in rounds}) > 1:
        raise ValueError("every decode round must have the same number of stages")


def decode_ms(rounds: Sequence[PhaseTimes], k_d: int) -> float:
    """T_d = Σ_{k=1..n−2} max(K_d·β(k), R(k)) + R(n−1) + (K_d − 1)·β(n−1); T_d = 0 for n = 1 (ms).

    `rounds[k-1]` holds the times of decode round k (context s + k), k = 1..n−1, so n = len(rounds) + 1.
    Exact for constant times, where it reduces to max(R + ((n−1)·K_d − 1)·β, (n−1)·R + (K_d − 1)·β).
    With times that change with k it is a per-round approximation: an upper bound when every stage and
    link time is non-decreasing in k (it lets the bottleneck move between resources at no cost), and
    neither bound in general when times shrink.
    """
    _check_count("K_d", k_d)
    _check_rounds(rounds)
    if not rounds:
        return 0.0
    cycles = math.fsum(cycle_ms(r, k_d) for r in rounds[:-1])
    return cycles + pass_ms(rounds[-1], k_d)


def pipeline_time(
    prefill: PhaseTimes, rounds: Sequence[PhaseTimes], k_p: int, k_d: int
) -> PipelineTime:
    """T = T_p + T_d: prefill, barrier, then the n − 1 decode rounds (ms)."""
    _check_rounds(rounds)
    if rounds and rounds[0].n_stages != prefill.n_stages:
        raise ValueError("prefill and decode must have the same number of stages")
    t_p = prefill_ms(prefill, k_p)
    t_d = decode_ms(rounds, k_d)
    return PipelineTime(prefill_ms=t_p, decode_ms=t_d, total_ms=t_p + t_d)


def throughput_tok_s(batch: int, gen_len: int, timing: PipelineTime) -> float:
    """Throughput = B·n / T, with T converted from ms to s (tokens/s)."""
    _check_count("B", batch)
    _check_count("n", gen_len)
    if not timing.total_ms > 0:
        raise ValueError(f"total time must be > 0 ms, got {timing.total_ms!r}")
    return batch * gen_len / (timing.total_ms / 1000.0)


def micro_batches(batch: int, micro_batch: int) -> int:
    """K = ceil(B / b): micro-batches for global batch B at micro-batch size b (the last may be partial)."""
    _check_count("B", batch)
    _check_count("b", micro_batch)
    return -(-batch // micro_batch)


def surrogate_points(gen_len: int, points: int = 3) -> tuple[int, ...]:
    """The decode rounds k the surrogate evaluates: `points` evenly spaced in 1..n−1, both ends included.

    Fewer when n − 1 < points; empty for n = 1.
    """
    _check_count("n", gen_len)
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    last = gen_len - 1
    if last < 1:
        return ()
    ks = {1 + round(i * (last - 1) / (points - 1)) for i in range(points)}
    return tuple(sorted(ks))


def surrogate_cycle_weights(gen_len: int, points: int = 3) -> tuple[tuple[int, float], ...]:
    """Weights w_k with Σ_{k=1..n−2} cycle(k) ≈ Σ_{k in points} w_k·cycle(k) (trapezoid in k).

    The approximation replaces cycle(k) by the piecewise-linear interpolant through the sampled rounds
    (the last sample is k = n − 1, which the drain term evaluates anyway) and sums it over the integers
    k = 1..n−2. It is exact where cycle(k) is linear between samples, and an upper bound where cycle(k)
    is convex in k (a max of terms linear in the context length). A MILP can use these weights on its
    epigraph variables of cycle(k).
    """
    ks = surrogate_points(gen_len, points)
    weights = dict.fromkeys(ks, 0.0)
    for k in range(1, gen_len - 1):
        right = next(i for i, kk in enumerate(ks) if kk >= k)
        if ks[right] == k:
            weights[k] += 1.0
            continue
        a, b = ks[right - 1], ks[right]
        weights[a] += (b - k) / (b - a)
        weights[b] += (k - a) / (b - a)
    return tuple((k, w) for k, w in weights.items() if w != 0.0)


def decode_surrogate_ms(
    round_at: Callable[[int], PhaseTimes], gen_len: int, k_d: int, points: int = 3
) -> float:
    """T_d ≈ Σ_k w_k·max(K_d·β(k), R(k)) + R(n−1) + (K_d − 1)·β(n−1), from a few rounds only (ms).

    An approximation of `decode_ms` for the solver: `round_at(k)` is called only for the rounds of
    `surrogate_points` (at most `points`, including k = n − 1), and the cycles of the other rounds are
    interpolated linearly in k (`surrogate_cycle_weights`). The drain term is exact. Equal to
    `decode_ms` for constant times and whenever n − 1 <= points; plans are re-scored with `decode_ms`.
    """
    _check_count("K_d", k_d)
    ks = surrogate_points(gen_len, points)
    if not ks:
        return 0.0
    at = {k: round_at(k) for k in ks}
    _check_rounds(list(at.values()))
    cycles = math.fsum(w * cycle_ms(at[k], k_d) for k, w in surrogate_cycle_weights(gen_len, points))
    return cycles + pass_ms(at[gen_len - 1], k_d)
