"""Discrete-event simulation of the ring pipeline, independent of the closed forms in `pipeline`.

Resources are the N stages and the N links (link j: stage j -> stage j+1; the last link returns from
the last stage to the first). Each resource serves one micro-batch at a time, first come first served,
and a micro-batch visits stage 0, link 0, stage 1, ..., stage N−1, link N−1 on every trip.

- Prefill: K_p micro-batches arrive at stage 0 at time 0 and make one trip each; the return yields the
  micro-batch's first token.
- Barrier: decode starts when the last prefill micro-batch has returned.
- Decode: K_d micro-batches (after regrouping) arrive at stage 0 at the barrier and make n − 1 trips
  (rounds); a micro-batch enters round k at stage 0 only after its round k − 1 has returned. Round k
  uses `rounds[k-1]`'s times, so times may change from round to round.

The simulation is event driven (a time-ordered heap of arrivals and completions), so it checks the
closed forms rather than restating them.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llmpq.costmodel.pipeline import PhaseTimes

Phase = Literal["prefill", "decode"]
ResourceKind = Literal["stage", "link"]

_ARRIVE = 0
_DONE = 1


@dataclass(frozen=True)
class TraceEvent:
    """One service of one micro-batch on one resource; times in ms from the start of prefill.

    `index` is the stage j, or the link j -> j+1 (the last link returns to stage 0). `round` is 0 in
    prefill and k = 1..n−1 in decode.
    """

    phase: Phase
    kind: ResourceKind
    index: int
    micro_batch: int
    round: int
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class SimulationResult:
    """Simulated prefill time (start to barrier), decode time (barrier to last return), their sum."""

    prefill_ms: float
    decode_ms: float
    total_ms: float
    trace: tuple[TraceEvent, ...] = ()


@dataclass(frozen=True)
class _PhaseResult:
    end_ms: float
    trace: tuple[TraceEvent, ...]


def _durations(times: PhaseTimes) -> tuple[float, ...]:
    """Service time of each resource in visiting order: stage 0, link 0, stage 1, link 1, ..."""
    return tuple(d for pair in zip(times.stage_ms, times.comm_ms) for d in pair)


def _run_phase(
    phase: Phase,
    rounds: Sequence[PhaseTimes],
    n_micro: int,
    start_ms: float,
    record: bool,
) -> _PhaseResult:
    """Simulate `n_micro` micro-batches arriving at stage 0 at `start_ms`, each making len(rounds) trips."""
    durations = [_durations(r) for r in rounds]
    n_res = len(durations[0])
    first_round = 0 if phase == "prefill" else 1
    queues: list[deque[tuple[int, int]]] = [deque() for _ in range(n_res)]
    busy = [False] * n_res
    heap: list[tuple[float, int, int, int, int, int]] = []
    order = itertools.count()
    trace: list[TraceEvent] = []
    end_ms = start_ms

    def start_next(res: int, now: float) -> None:
        micro, rnd = queues[res].popleft()
        busy[res] = True
        done = now + durations[rnd][res]
        heapq.heappush(heap, (done, next(order), _DONE, res, micro, rnd))
        if record:
            trace.append(
                TraceEvent(
                    phase=phase,
                    kind="stage" if res % 2 == 0 else "link",
                    index=res // 2,
                    micro_batch=micro,
                    round=first_round + rnd,
                    start_ms=now,
                    end_ms=done,
                )
            )

    for micro in range(n_micro):
        heapq.heappush(heap, (start_ms, next(order), _ARRIVE, 0, micro, 0))
    while heap:
        now, _, event, res, micro, rnd = heapq.heappop(heap)
        if event == _ARRIVE:
            queues[res].append((micro, rnd))
            if not busy[res]:
                start_next(res, now)
            continue
        busy[res] = False
        if res + 1 < n_res:
            heapq.heappush(heap, (now, next(order), _ARRIVE, res + 1, micro, rnd))
        elif rnd + 1 < len(durations):
            heapq.heappush(heap, (now, next(order), _ARRIVE, 0, micro, rnd + 1))
        else:
            end_ms = max(end_ms, now)
        if queues[res]:
            start_next(res, now)
    return _PhaseResult(end_ms=end_ms, trace=tuple(trace))


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def simulate(
    prefill: PhaseTimes,
    rounds: Sequence[PhaseTimes],
    k_p: int,
    k_d: int,
    *,
    trace: bool = False,
) -> SimulationResult:
    """Simulate prefill of K_p micro-batches, the barrier, and n − 1 = len(rounds) decode rounds of K_d.

    `rounds[k-1]` are the times of decode round k. With `trace`, every service is recorded.
    """
    _check_count("K_p", k_p)
    _check_count("K_d", k_d)
    if any(r.n_stages != prefill.n_stages for r in rounds):
        raise ValueError("prefill and every decode round must have the same number of stages")
    pre = _run_phase("prefill", [prefill], k_p, 0.0, trace)
    if rounds:
        dec = _run_phase("decode", rounds, k_d, pre.end_ms, trace)
    else:
        dec = _PhaseResult(end_ms=pre.end_ms, trace=())
    return SimulationResult(
        prefill_ms=pre.end_ms,
        decode_ms=dec.end_ms - pre.end_ms,
        total_ms=dec.end_ms,
        trace=pre.trace + dec.trace,
    )
