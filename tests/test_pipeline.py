"""Pipeline makespan: closed forms, the event simulator, and their agreement."""

from __future__ import annotations

import math
import random

import pytest

from llmpq.costmodel.pipeline import (
    PhaseTimes,
    PipelineTime,
    bottleneck_ms,
    cycle_ms,
    decode_ms,
    decode_surrogate_ms,
    micro_batches,
    pipeline_time,
    prefill_ms,
    ring_trip_ms,
    surrogate_cycle_weights,
    surrogate_points,
    throughput_tok_s,
)
from llmpq.costmodel.simulator import simulate

TWO_STAGES = PhaseTimes(stage_ms=(3.0, 5.0), comm_ms=(1.0, 2.0))  # β = 5, R = 11
LINK_BOUND = PhaseTimes(stage_ms=(1.0, 1.0), comm_ms=(4.0, 0.5))  # β = 4 (link 0 -> 1), R = 6.5


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ---- hand-computed cases ----------------------------------------------------------------------


def test_bottleneck_and_ring_trip():
    assert bottleneck_ms(TWO_STAGES) == 5.0  # max(3, 5, 1, 2)
    assert ring_trip_ms(TWO_STAGES) == 11.0  # 3 + 1 + 5 + 2
    assert bottleneck_ms(LINK_BOUND) == 4.0  # the link is the bottleneck
    assert ring_trip_ms(LINK_BOUND) == 6.5


def test_prefill_two_stages_by_hand():
    # R + (K_p - 1)·β = 11 + 1·5 = 16
    assert prefill_ms(TWO_STAGES, 2) == 16.0
    # 11 + 4·5 = 31
    assert prefill_ms(TWO_STAGES, 5) == 31.0
    assert simulate(TWO_STAGES, [], 2, 1).prefill_ms == 16.0
    assert simulate(TWO_STAGES, [], 5, 1).prefill_ms == 31.0


def test_decode_two_stages_latency_bound_by_hand():
    # K_d = 1, n = 4: cycle = max(1·5, 11) = 11; T_d = 2·11 + 11 + 0·5 = 33
    rounds = [TWO_STAGES] * 3
    assert cycle_ms(TWO_STAGES, 1) == 11.0
    assert decode_ms(rounds, 1) == 33.0
    assert simulate(TWO_STAGES, rounds, 2, 1).decode_ms == 33.0


def test_decode_two_stages_throughput_bound_by_hand():
    # K_d = 3, n = 4: cycle = max(3·5, 11) = 15; T_d = 2·15 + 11 + 2·5 = 51
    rounds = [TWO_STAGES] * 3
    assert decode_ms(rounds, 3) == 51.0
    assert simulate(TWO_STAGES, rounds, 2, 3).decode_ms == 51.0


def test_decode_link_bottleneck_by_hand():
    # K_d = 4, n = 3: cycle = max(4·4, 6.5) = 16; T_d = 16 + 6.5 + 3·4 = 34.5
    rounds = [LINK_BOUND] * 2
    assert decode_ms(rounds, 4) == 34.5
    assert simulate(LINK_BOUND, rounds, 1, 4).decode_ms == 34.5


def test_pipeline_time_and_throughput_by_hand():
    # T_p = 16, T_d = 51, T = 67 ms; B = 6 sequences, n = 4 tokens: 24 tokens / 0.067 s
    pt = pipeline_time(TWO_STAGES, [TWO_STAGES] * 3, 2, 3)
    assert pt == PipelineTime(prefill_ms=16.0, decode_ms=51.0, total_ms=67.0)
    assert throughput_tok_s(6, 4, pt) == pytest.approx(24 / 0.067)
    sim = simulate(TWO_STAGES, [TWO_STAGES] * 3, 2, 3)
    assert sim.total_ms == 67.0


def test_single_token_has_no_decode():
    assert decode_ms([], 4) == 0.0
    pt = pipeline_time(TWO_STAGES, [], 2, 4)
    assert pt.decode_ms == 0.0 and pt.total_ms == pt.prefill_ms == 16.0
    assert simulate(TWO_STAGES, [], 2, 4).decode_ms == 0.0


def test_micro_batches():
    assert micro_batches(32, 8) == 4
    assert micro_batches(32, 5) == 7  # the last micro-batch holds 2
    assert micro_batches(3, 8) == 1
    assert micro_batches(1, 1) == 1


# ---- one stage: decode grows with n ------------------------------------------------------------


@pytest.mark.parametrize("t, c", [(2.0, 0.5), (7.0, 0.0), (0.25, 3.0)])
def test_one_stage_decode_is_sequential(t, c):
    one = PhaseTimes(stage_ms=(t,), comm_ms=(c,))
    for n in (2, 3, 50, 100):
        rounds = [one] * (n - 1)
        assert decode_ms(rounds, 1) == pytest.approx((n - 1) * (t + c), rel=1e-12)
        assert simulate(one, rounds, 1, 1).decode_ms == pytest.approx((n - 1) * (t + c), rel=1e-12)


def test_one_stage_doubling_tokens_doubles_decode():
    # The paper's reference code kept decode flat in n for K_d = 1; here 50 -> 100 tokens is 99/49 ≈ 2.02.
    one = PhaseTimes(stage_ms=(4.0,), comm_ms=(0.1,))
    d50 = decode_ms([one] * 49, 1)
    d100 = decode_ms([one] * 99, 1)
    assert d100 / d50 == pytest.approx(2.0, rel=0.05)
    s50 = simulate(one, [one] * 49, 1, 1).decode_ms
    s100 = simulate(one, [one] * 99, 1, 1).decode_ms
    assert s100 / s50 == pytest.approx(2.0, rel=0.05)


def test_one_stage_many_micro_batches():
    # N = 1, K_d = 12 ≫ N: β = 2, R = 3, cycle = max(24, 3) = 24; n = 3: T_d = 24 + 3 + 11·2 = 49
    one = PhaseTimes(stage_ms=(2.0,), comm_ms=(1.0,))
    assert decode_ms([one] * 2, 12) == 49.0
    assert simulate(one, [one] * 2, 1, 12).decode_ms == 49.0


# ---- the simulator's schedule ------------------------------------------------------------------


def test_simulator_trace_two_stages_by_hand():
    trace = simulate(TWO_STAGES, [], 2, 1, trace=True).trace
    spans = {(e.kind, e.index, e.micro_batch): (e.start_ms, e.end_ms) for e in trace}
    assert spans[("stage", 0, 0)] == (0.0, 3.0)
    assert spans[("stage", 0, 1)] == (3.0, 6.0)
    assert spans[("link", 0, 1)] == (6.0, 7.0)
    assert spans[("stage", 1, 0)] == (4.0, 9.0)
    assert spans[("stage", 1, 1)] == (9.0, 14.0)  # waits 2 ms for stage 1 (FIFO)
    assert spans[("link", 1, 1)] == (14.0, 16.0)  # the return link: first token of micro-batch 1


@pytest.mark.parametrize("n_stages, k_p, k_d, n_rounds", [(3, 4, 2, 5), (2, 1, 9, 4), (4, 7, 1, 3)])
def test_simulator_trace_respects_resources_barrier_and_rounds(n_stages, k_p, k_d, n_rounds):
    rng = random.Random(n_stages * 100 + k_d)
    pre = PhaseTimes(
        tuple(rng.uniform(1, 5) for _ in range(n_stages)), tuple(rng.uniform(0, 2) for _ in range(n_stages))
    )
    dec = PhaseTimes(
        tuple(rng.uniform(0.1, 1) for _ in range(n_stages)), tuple(rng.uniform(0, 1) for _ in range(n_stages))
    )
    res = simulate(pre, [dec] * n_rounds, k_p, k_d, trace=True)
    assert len(res.trace) == 2 * n_stages * (k_p + k_d * n_rounds)
    by_resource: dict[tuple[str, int], list] = {}
    for e in res.trace:
        by_resource.setdefault((e.kind, e.index), []).append(e)
    for events in by_resource.values():  # one micro-batch at a time
        events.sort(key=lambda e: e.start_ms)
        assert all(a.end_ms <= b.start_ms + 1e-12 for a, b in zip(events, events[1:]))
    pre_end = max(e.end_ms for e in res.trace if e.phase == "prefill")
    assert pre_end == res.prefill_ms
    assert min(e.start_ms for e in res.trace if e.phase == "decode") >= pre_end
    ret = {(e.micro_batch, e.round): e.end_ms for e in res.trace if e.kind == "link" and e.index == n_stages - 1}
    for e in res.trace:
        if e.phase == "decode" and e.kind == "stage" and e.index == 0 and e.round > 1:
            assert e.start_ms >= ret[(e.micro_batch, e.round - 1)]
    assert res.total_ms == pytest.approx(res.prefill_ms + res.decode_ms, rel=1e-12)


# ---- closed form vs simulator ------------------------------------------------------------------


def random_phase(rng: random.Random, n_stages: int, link_bound: bool) -> PhaseTimes:
    stages = tuple(rng.uniform(0.1, 10.0) * rng.choice((1.0, 1.0, 6.0)) for _ in range(n_stages))
    links = [rng.uniform(0.0, 2.0) for _ in range(n_stages)]
    if link_bound:
        links[rng.randrange(n_stages)] = max(stages) * rng.uniform(1.0, 3.0)
    return PhaseTimes(stages, tuple(links))


def random_case(rng: random.Random):
    n_stages = rng.randint(1, 6)
    pre = random_phase(rng, n_stages, rng.random() < 0.3)
    dec = random_phase(rng, n_stages, rng.random() < 0.3)
    regime = rng.random()
    if regime < 0.35 and n_stages > 1:
        k_d = rng.randint(1, n_stages - 1)  # K_d < N
    elif regime < 0.7:
        k_d = rng.randint(min(2 * n_stages, 12), 12)  # K_d ≫ N
    else:
        k_d = rng.randint(1, 12)
    k_p = rng.randint(1, 12)
    n_rounds = rng.randint(1, 60) if rng.random() < 0.95 else 0
    return pre, dec, k_p, k_d, n_rounds


def test_closed_form_equals_simulator_constant_times():
    rng = random.Random(20240302)
    seen = {"kd_lt_n": 0, "kd_ge_2n": 0, "link_bound": 0, "no_decode": 0}
    worst = 0.0
    for _ in range(1000):
        pre, dec, k_p, k_d, n_rounds = random_case(rng)
        rounds = [dec] * n_rounds
        closed = pipeline_time(pre, rounds, k_p, k_d)
        sim = simulate(pre, rounds, k_p, k_d)
        worst = max(worst, rel(closed.prefill_ms, sim.prefill_ms), rel(closed.total_ms, sim.total_ms))
        if n_rounds:
            worst = max(worst, rel(closed.decode_ms, sim.decode_ms))
        n = dec.n_stages
        seen["kd_lt_n"] += k_d < n
        seen["kd_ge_2n"] += k_d >= 2 * n
        seen["link_bound"] += max(dec.comm_ms) > max(dec.stage_ms)
        seen["no_decode"] += n_rounds == 0
    assert worst <= 1e-9
    assert all(count >= 20 for count in seen.values()), seen


def test_closed_form_constant_times_two_regimes():
    # Constant times: T_d = max(R + ((n−1)·K_d − 1)·β, (n−1)·R + (K_d − 1)·β).
    rng = random.Random(7)
    for _ in range(200):
        dec = random_phase(rng, rng.randint(1, 6), rng.random() < 0.3)
        k_d, n = rng.randint(1, 12), rng.randint(2, 60)
        beta, trip = bottleneck_ms(dec), ring_trip_ms(dec)
        expect = max(trip + ((n - 1) * k_d - 1) * beta, (n - 1) * trip + (k_d - 1) * beta)
        assert decode_ms([dec] * (n - 1), k_d) == pytest.approx(expect, rel=1e-12)


def growing_case(rng: random.Random):
    pre, dec, k_p, k_d, n_rounds = random_case(rng)
    n_rounds = max(n_rounds, 1)
    growth = rng.uniform(0.0, 1.0)  # stage times grow by up to 2x over the generation; links constant
    rounds = [
        PhaseTimes(tuple(t * (1.0 + growth * k / n_rounds) for t in dec.stage_ms), dec.comm_ms)
        for k in range(1, n_rounds + 1)
    ]
    return pre, rounds, k_p, k_d


def test_closed_form_with_growing_decode_times_is_a_close_upper_bound():
    # Not exact when times change with k: the per-round max lets the bottleneck move for free.
    # Provably an upper bound when every stage and link time is non-decreasing in k. On this seed the
    # closed form overestimates the simulated decode time by at most 2.6%.
    rng = random.Random(11)
    errors = []
    for _ in range(300):
        pre, rounds, k_p, k_d = growing_case(rng)
        closed = decode_ms(rounds, k_d)
        sim = simulate(pre, rounds, k_p, k_d).decode_ms
        errors.append((closed - sim) / sim)
    assert min(errors) >= -1e-12
    assert max(errors) < 0.05


def test_closed_form_is_not_a_bound_when_times_shrink():
    # N = 1, K_d = 2. Round 1: t = 2, c = 2; round 2: t = 1, c = 1.
    # Closed form: max(2·2, 4) + (2 + 1·1) = 7. Simulated: micro-batch 1 returns from round 1 at 6;
    # round 2 of micro-batch 0 waits for the link until 6 (link 6-7), micro-batch 1 runs 6-7, 7-8: 8.
    rounds = [PhaseTimes((2.0,), (2.0,)), PhaseTimes((1.0,), (1.0,))]
    assert decode_ms(rounds, 2) == 7.0
    assert simulate(rounds[0], rounds, 1, 2).decode_ms == 8.0


@pytest.mark.slow
def test_closed_form_equals_simulator_many_cases():
    rng = random.Random(99)
    for _ in range(5000):
        pre, dec, k_p, k_d, n_rounds = random_case(rng)
        closed = pipeline_time(pre, [dec] * n_rounds, k_p, k_d)
        sim = simulate(pre, [dec] * n_rounds, k_p, k_d)
        assert rel(closed.total_ms, sim.total_ms) <= 1e-9


# ---- the solver's surrogate --------------------------------------------------------------------


def test_surrogate_points_and_weights():
    assert surrogate_points(1) == ()
    assert surrogate_points(2) == (1,)
    assert surrogate_points(101, 3) == (1, 51, 100)
    assert surrogate_points(101, 2) == (1, 100)
    for n in (2, 3, 4, 5, 17, 100):
        for points in (2, 3):
            weights = surrogate_cycle_weights(n, points)
            assert math.fsum(w for _, w in weights) == pytest.approx(n - 2)
            assert all(w > 0 for _, w in weights)


def test_surrogate_exact_for_constant_and_linear_cycles():
    dec = PhaseTimes((3.0, 5.0), (1.0, 2.0))
    for n in (1, 2, 3, 10, 101):
        exact = decode_ms([dec] * (n - 1), 3)
        assert decode_surrogate_ms(lambda k: dec, n, 3) == pytest.approx(exact, rel=1e-12)

    def grow(k: int) -> PhaseTimes:  # K_d = 1: latency-bound, so cycle(k) = R(k) is linear in k
        return PhaseTimes((3.0 + 0.1 * k, 5.0 + 0.2 * k), (1.0, 2.0))

    exact = decode_ms([grow(k) for k in range(1, 100)], 1)
    assert decode_surrogate_ms(grow, 100, 1, points=2) == pytest.approx(exact, rel=1e-12)


def test_surrogate_calls_few_rounds_and_stays_close():
    calls: list[int] = []
    rng = random.Random(3)
    base = random_phase(rng, 4, False)

    def at(k: int) -> PhaseTimes:
        calls.append(k)
        return PhaseTimes(tuple(t * (1 + 0.01 * k) for t in base.stage_ms), base.comm_ms)

    approx = decode_surrogate_ms(at, 200, 3, points=3)
    assert sorted(calls) == [1, 100, 199]
    exact = decode_ms([at(k) for k in range(1, 200)], 3)
    assert approx == pytest.approx(exact, rel=0.02)


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stages, links, error",
    [
        ((), (), ValueError),
        ((1.0, 2.0), (1.0,), ValueError),
        ((1.0,), (1.0, 2.0), ValueError),
        ((-1.0,), (0.0,), ValueError),
        ((1.0,), (-0.5,), ValueError),
        ((math.nan,), (0.0,), ValueError),
        ((math.inf,), (0.0,), ValueError),
        (("1",), (0.0,), TypeError),
        ((True,), (0.0,), TypeError),
    ],
)
def test_phase_times_validation(stages, links, error):
    with pytest.raises(error):
        PhaseTimes(stages, links)


def test_phase_times_is_frozen_and_accepts_lists():
    p = PhaseTimes([1, 2.5], [0, 1])
    assert p.stage_ms == (1, 2.5) and p.comm_ms == (0, 1)
    with pytest.raises(AttributeError):
        p.stage_ms = (3.0, 3.0)  # type: ignore[misc]


def test_count_validation():
    with pytest.raises(ValueError):
        prefill_ms(TWO_STAGES, 0)
    with pytest.raises(ValueError):
        decode_ms([TWO_STAGES], 0)
    with pytest.raises(TypeError):
        decode_ms([TWO_STAGES], 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        micro_batches(32, 0)
    with pytest.raises(ValueError):
        micro_batches(0, 4)
    with pytest.raises(TypeError):
        micro_batches(32, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        surrogate_points(10, points=1)
    with pytest.raises(ValueError):
        decode_surrogate_ms(lambda k: TWO_STAGES, 0, 1)


def test_shape_and_total_validation():
    three = PhaseTimes((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        decode_ms([TWO_STAGES, three], 1)
    with pytest.raises(ValueError):
        pipeline_time(three, [TWO_STAGES], 1, 1)
    with pytest.raises(TypeError):
        decode_ms([(1.0, 2.0)], 1)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        throughput_tok_s(4, 10, PipelineTime(0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        throughput_tok_s(0, 10, PipelineTime(1.0, 0.0, 1.0))


def test_simulator_validation():
    three = PhaseTimes((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        simulate(TWO_STAGES, [three], 1, 1)
    with pytest.raises(ValueError):
        simulate(TWO_STAGES, [], 0, 1)
    with pytest.raises(ValueError):
        simulate(TWO_STAGES, [TWO_STAGES], 1, 0)
