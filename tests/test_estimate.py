"""Estimator: stage times, links, the pipeline formulas over every decode round, memory."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from llmpq.config import Link, compose_experiment
from llmpq.costmodel.comm import fit_link, hidden_bytes, link_between, transfer_ms
from llmpq.costmodel.context import build_context
from llmpq.costmodel.estimate import StageAssignment, estimate, stage_time_ms, with_kernels
from llmpq.costmodel.pipeline import PhaseTimes
from llmpq.costmodel.simulator import simulate


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    exp = compose_experiment(["model=opt-30b", "cluster=paper-c3", "workload=s512-n100-b32"])
    return build_context(exp, tmp_path_factory.mktemp("results"))


def one_stage(ctx, bits=8):
    return [StageAssignment("v100-32g", "n1", 0, 48, (bits,) * 48)]


def two_stages():
    return [StageAssignment("t4", "n0", 0, 20, (4,) * 20), StageAssignment("v100-32g", "n1", 20, 48, (8,) * 10 + (4,) * 18)]


def test_one_stage_doubling_n_doubles_decode(ctx):
    base = estimate(ctx, one_stage(ctx), 8, 8)
    ctx2 = replace(ctx, workload=replace(ctx.workload, gen_len=2 * ctx.workload.gen_len))
    double = estimate(ctx2, one_stage(ctx), 8, 8)
    # n - 1 rounds: (2n - 1) / (n - 1) = 199 / 99 at equal per-round cost, plus the longer contexts
    assert double.decode_s / base.decode_s == pytest.approx(2.0, rel=0.05)
    assert double.prefill_s == base.prefill_s
    assert base.comm_decode_ms == (0.0,)


def test_one_stage_is_sequential(ctx):
    """One stage, K_d micro-batches: every round costs K_d stage times; nothing overlaps."""
    e = estimate(ctx, one_stage(ctx), 32, 8)
    s, n = ctx.workload.prompt_len, ctx.workload.gen_len
    rounds = [stage_time_ms(ctx, one_stage(ctx)[0], "decode", 8, s + k, first=True, last=True) for k in range(1, n)]
    assert e.decode_s * 1e3 == pytest.approx(4 * math.fsum(rounds))
    assert e.prefill_s * 1e3 == pytest.approx(stage_time_ms(ctx, one_stage(ctx)[0], "prefill", 32, s, first=True, last=True))


def test_two_stages_match_manual_composition(ctx):
    b_p, b_d = 4, 16
    stages = [with_kernels(ctx, st, b_p, b_d) for st in two_stages()]  # the kernels estimate chooses
    w = ctx.workload
    s, n, B = w.prompt_len, w.gen_len, w.batch
    k_p, k_d = math.ceil(B / b_p), math.ceil(B / b_d)
    inter = ctx.cluster.inter_node
    # prefill: stage times, activations forward (b_p x s x hidden fp16), token ids back (b_p x 8)
    tp = [stage_time_ms(ctx, stages[0], "prefill", b_p, s, first=True, last=False),
          stage_time_ms(ctx, stages[1], "prefill", b_p, s, first=False, last=True)]
    cp = [inter.latency_us / 1e3 + b_p * s * 7168 * 2 / (inter.bandwidth_gbps * 1e6),
          inter.latency_us / 1e3 + b_p * 8 / (inter.bandwidth_gbps * 1e6)]
    t_p = sum(tp) + sum(cp) + (k_p - 1) * max(tp + cp)
    cd = [inter.latency_us / 1e3 + b_d * 7168 * 2 / (inter.bandwidth_gbps * 1e6),
          inter.latency_us / 1e3 + b_d * 8 / (inter.bandwidth_gbps * 1e6)]

    def td(k):
        return [stage_time_ms(ctx, stages[0], "decode", b_d, s + k, first=True, last=False),
                stage_time_ms(ctx, stages[1], "decode", b_d, s + k, first=False, last=True)]

    cycles = sum(max(k_d * max(td(k) + cd), sum(td(k)) + sum(cd)) for k in range(1, n - 1))
    t_d = cycles + sum(td(n - 1)) + sum(cd) + (k_d - 1) * max(td(n - 1) + cd)
    e = estimate(ctx, stages, b_p, b_d)
    assert e.prefill_s * 1e3 == pytest.approx(t_p, rel=1e-9)
    assert e.decode_s * 1e3 == pytest.approx(t_d, rel=1e-9)
    assert e.throughput_tok_s == pytest.approx(B * n / ((t_p + t_d) / 1e3), rel=1e-9)
    assert e.comm_prefill_ms == pytest.approx(cp) and e.comm_decode_ms == pytest.approx(cd)
    assert e.stage_decode_ms == pytest.approx(td(n // 2))
    assert e.stage_prefill_ms == pytest.approx(tp)


def test_two_stages_agree_with_event_simulation(ctx):
    stages = two_stages()
    e = estimate(ctx, stages, 8, 8)
    s, n = ctx.workload.prompt_len, ctx.workload.gen_len
    pre = PhaseTimes(e.stage_prefill_ms, e.comm_prefill_ms)
    rounds = [PhaseTimes(tuple(stage_time_ms(ctx, st, "decode", 8, s + k, first=j == 0, last=j == 1)
                               for j, st in enumerate(stages)), e.comm_decode_ms) for k in range(1, n)]
    sim = simulate(pre, rounds, 4, 4)
    assert (e.prefill_s + e.decode_s) * 1e3 == pytest.approx(sim.total_ms, rel=0.01)


def test_memory_and_fits(ctx):
    e = estimate(ctx, two_stages(), 8, 8)
    assert len(e.memory) == 2
    assert e.memory[0].embed_bytes > 0 and e.memory[0].head_bytes == 0
    assert e.memory[1].head_bytes > 0 and e.memory[1].embed_bytes == 0
    assert e.fits == all(m.fits for m in e.memory)
    assert not estimate(ctx, [StageAssignment("t4", "n0", 0, 48, (16,) * 48)], 8, 8).fits
    assert e.bottleneck_stage in (0, 1)


def test_bad_plans_are_refused(ctx):
    with pytest.raises(ValueError, match="contiguous"):
        estimate(ctx, [StageAssignment("t4", "n0", 0, 20, (4,) * 20), StageAssignment("t4", "n0", 21, 48, (4,) * 27)], 8, 8)
    with pytest.raises(ValueError, match="cover"):
        estimate(ctx, [StageAssignment("t4", "n0", 0, 20, (4,) * 20)], 8, 8)
    with pytest.raises(ValueError, match="no kernel"):
        estimate(ctx, [StageAssignment("t4", "n0", 0, 48, (2,) * 48)], 8, 8)
    with pytest.raises(ValueError):
        StageAssignment("t4", "n0", 0, 2, (4,))


def test_links_and_payloads(ctx):
    c = ctx.cluster
    assert link_between(c, "n0", "n0") == c.intra_node
    assert link_between(c, "n0", "n1") == c.inter_node
    measured = {"inter_node": Link(bandwidth_gbps=9.0, latency_us=1.0)}
    assert link_between(c, "n1", "n0", measured) == measured["inter_node"]
    with pytest.raises(ValueError):
        link_between(c, "n0", "nowhere")
    assert transfer_ms(Link(bandwidth_gbps=1.0, latency_us=50), 10**6) == pytest.approx(0.05 + 1.0)
    assert hidden_bytes(ctx.shape, 4, 512, ctx.devices["t4"]) == 4 * 512 * 7168 * 2


def test_fit_link_recovers_alpha_and_bandwidth():
    link = Link(bandwidth_gbps=2.5, latency_us=80)
    sizes = [4096, 65536, 1 << 20, 8 << 20]
    fitted = fit_link(sizes, [transfer_ms(link, x) for x in sizes])
    assert fitted.bandwidth_gbps == pytest.approx(2.5, rel=1e-6)
    assert fitted.latency_us == pytest.approx(80, rel=1e-6)


def test_fit_link_fits_small_payloads_by_relative_error():
    """The measured local-cpu busy points: a plain least-squares line, decided by the 8 MiB point, has a negative
    intercept (α clamped to 0, a 4 KiB message predicted at 0.01 ms); the relative fit keeps each point within 40%."""
    sizes, times = [4096, 65536, 1 << 20, 8 << 20], [0.050, 0.059, 0.285, 3.87]
    fitted = fit_link(sizes, times)
    assert fitted.latency_us > 30
    for x, t in zip(sizes, times):
        assert transfer_ms(fitted, x) == pytest.approx(t, rel=0.4)


def test_context_reads_measured_links(tmp_path):
    from llmpq import paths
    from llmpq.artifacts import write_table

    exp = compose_experiment(["model=opt-30b", "cluster=paper-c3", "workload=s512-n100-b32"])
    rows = [{"cluster": "paper-c3", "link": "inter_node", "payload_bytes": x, "latency_ms": 0.1 + x / 5e6,
             "repeats": 3, "load": "idle"} for x in (1000, 10**6, 10**7)]
    write_table("links", rows, paths.links_path(tmp_path, "paper-c3"))
    ctx = build_context(exp, Path(tmp_path))
    assert ctx.links["inter_node"].bandwidth_gbps == pytest.approx(5.0)
    assert ctx.per_message == {}
    # the message cost under load, where measured, is what the sending stage pays; the link keeps the idle fit
    busy = [{**r, "load": "busy", "latency_ms": 0.3 + r["payload_bytes"] / 2e6} for r in rows]
    write_table("links", rows + busy, paths.links_path(tmp_path, "paper-c3"))
    ctx = build_context(exp, Path(tmp_path))
    assert ctx.links["inter_node"].bandwidth_gbps == pytest.approx(5.0)
    assert ctx.per_message["inter_node"].bandwidth_gbps == pytest.approx(2.0)
    assert ctx.per_message["inter_node"].latency_us == pytest.approx(300.0)
    assert ctx.latency.source("t4") == "roofline"


def _overhead_fits(extra_ms: float, loop_ms: float) -> dict:
    """Profile grids of the per-step overheads only: idle layer calls `extra_ms` slower than hot ones, a constant
    loop."""
    import numpy as np

    from llmpq.costmodel.latency import Grid

    b, length = np.asarray([1.0, 1.0, 16.0, 16.0]), np.asarray([16.0, 256.0, 16.0, 256.0])
    fits = {}
    for phase in ("prefill", "decode"):
        fits[("layer_hot", 16, "fp16", phase)] = Grid.from_points(b, length, np.full(4, 2.0), "hot")
        fits[("layer_idle", 16, "fp16", phase)] = Grid.from_points(b, length, np.full(4, 2.0 + extra_ms), "idle")
        fits[("loop", 16, "fp16", phase)] = Grid.from_points(np.asarray([1.0, 16.0]), np.asarray([1.0, 1.0]),
                                                             np.full(2, loop_ms), "loop")
    return fits


def test_step_overheads_enter_stage_times_and_the_milp(ctx):
    """t_j = Σ (layer + t_idle) + embed + head + t_loop, t_idle only in a multi-stage pipeline; the MILP's tables
    carry the same terms."""
    from llmpq.costmodel.latency import LatencyModel
    from llmpq.solve.quality import OmegaTable
    from llmpq.solve.tables import CostCache, build_tables, from_stages, stage_times
    import numpy as np

    lat = ctx.latency
    with_over = LatencyModel(lat.shape, lat.devices, lat.quant,
                             fits={"t4": _overhead_fits(0.6, 0.2), "v100-32g": _overhead_fits(0.2, 0.05)},
                             kernels=lat.kernels)
    ctx2 = replace(ctx, latency=with_over)
    assert with_over.after_idle_ms("t4", "decode") == pytest.approx(0.6) and with_over.loop_ms("t4", "decode", 8) == 0.2
    assert with_over.overhead_source("t4") == "profile" and lat.overhead_source("t4") == "none"
    st = two_stages()[0]
    s = ctx.workload.prompt_len
    ends = lat.embed_ms("t4", "decode", 8, 1)
    layers = stage_time_ms(ctx, st, "decode", 8, s + 5, first=True, last=False) - ends
    assert stage_time_ms(ctx2, st, "decode", 8, s + 5, first=True, last=False, pipelined=True) == pytest.approx(
        layers + len(st.bits) * 0.6 + ends + 0.2)
    assert stage_time_ms(ctx2, st, "decode", 8, s + 5, first=True, last=False) == pytest.approx(layers + ends + 0.2)
    # one stage: no idle cost, the loop cost per step
    single = estimate(ctx2, one_stage(ctx), 8, 8)
    assert single.stage_decode_ms[0] == pytest.approx(estimate(ctx, one_stage(ctx), 8, 8).stage_decode_ms[0] + 0.05)
    # the MILP's tables of a two-stage branch give the estimator's stage times
    e = estimate(ctx2, two_stages(), 8, 8)
    omega = OmegaTable((16, 8, 4, 3), np.zeros((48, 4)), "proxy")
    tb = build_tables(CostCache(ctx2), [("n0", "t4"), ("n1", "v100-32g")], 8, 8, omega)
    tp, _ = stage_times(tb, from_stages(tb, e.stages))
    assert tp == pytest.approx(np.asarray(e.stage_prefill_ms))
    # a measured cost per message is paid by each sending stage of a pipeline, in the estimator and the MILP alike
    per_message = Link(bandwidth_gbps=1.0, latency_us=100.0)
    ctx3 = replace(ctx2, per_message={"inter_node": per_message})
    e3 = estimate(ctx3, two_stages(), 8, 8)
    sent = [hidden_bytes(ctx.shape, 8, s, ctx.devices["t4"]), 8 * 8]
    assert np.asarray(e3.stage_prefill_ms) - np.asarray(e.stage_prefill_ms) == pytest.approx(
        [transfer_ms(per_message, x) for x in sent])
    assert estimate(ctx3, one_stage(ctx), 8, 8).stage_prefill_ms == single.stage_prefill_ms
    tb3 = build_tables(CostCache(ctx3), [("n0", "t4"), ("n1", "v100-32g")], 8, 8, omega)
    tp3, _ = stage_times(tb3, from_stages(tb3, e3.stages))
    assert tp3 == pytest.approx(np.asarray(e3.stage_prefill_ms))
