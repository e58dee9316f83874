"""Kernel-true planning: plans record and respect each stage's weight kernels; the uniform-best baseline; memory
buffers as the runtime posts them."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from llmpq.config import WorkloadSpec, compose_experiment
from llmpq.costmodel.context import build_context
from llmpq.costmodel.estimate import StageAssignment, choose_kernel, estimate
from llmpq.costmodel.memory import POSTED_MESSAGES, buffers_bytes
from llmpq.solve.baselines import fast_common_bits, memory_balanced_counts, uniform_best
from llmpq.solve.orders import full_orders
from llmpq.solve.plan import PlanError, from_dict, read_plan, to_dict, to_json
from llmpq.solve.planner import solve
from llmpq.solve.quality import proxy_omega
from llmpq.solve.limits import SearchSettings
from llmpq.solve.tables import CostCache, build_tables

from test_solver import small_experiment


def paper(cluster: str, tmp_path, workload: str = "s512-n100-b32", **solver):
    base = compose_experiment([f"cluster={cluster}"])
    exp = compose_experiment([f"cluster={cluster}", f"model={base.cluster.model}", f"workload={workload}",
                              "solver=llmpq"])
    exp = replace(exp, solver=replace(exp.solver, **solver)) if solver else exp
    ctx = build_context(exp, tmp_path)
    return exp, ctx, proxy_omega(ctx.shape, tuple(sorted(exp.model.bits, reverse=True)))


def fast(ctx, stem: str, bits: int, kernel: str) -> bool:
    return ctx.latency.kernels.spec(kernel).fast


@pytest.mark.parametrize("cluster", ["paper-c2", "paper-c6", "paper-c11"])
def test_plans_for_ampere_gpus_use_fast_kernels_where_memory_allows(cluster, tmp_path):
    """Unbudgeted llmpq plans (roofline, proxy ω) on A100s: every bit-width on a cc >= 8.0 stage has a fast kernel
    (fp16 or Marlin); no 3-bit layer, which only the materialising torch kernel runs."""
    exp, ctx, omega = paper(cluster, tmp_path)
    plan = solve(exp, tmp_path, ctx=ctx, omega=omega).plan
    for s in plan.stages:
        if exp.devices[s.device].compute_capability >= 8.0:
            assert all(fast(ctx, s.device, b, k) for b, k in s.kernels), (s.device, s.kernels)
    assert 3 not in plan.bits


@pytest.mark.parametrize("cluster", ["paper-c3", "paper-c9", "paper-c10"])
def test_plan_only_plans_are_not_3_bits_everywhere_and_v100_never_uses_marlin(cluster, tmp_path):
    exp, ctx, omega = paper(cluster, tmp_path)
    plan = solve(exp, tmp_path, ctx=ctx, omega=omega).plan
    assert set(plan.bits) != {3}
    for s in plan.stages:
        assert dict(s.kernels).keys() == set(s.bits)
        if s.device.startswith("v100"):
            assert "marlin" not in dict(s.kernels).values()
        for b, k in s.kernels:
            assert k in ctx.latency.menu(s.device)[b]


def test_plan_json_records_kernels_and_reads_old_plans(tmp_path):
    exp, ctx, omega = paper("paper-c3", tmp_path)
    plan = solve(exp, tmp_path, ctx=ctx, omega=omega).plan
    data = json.loads(to_json(plan))
    for st, s in zip(data["stages"], plan.stages):
        assert st["kernels"] == {str(b): k for b, k in s.kernels}
    (tmp_path / "p.json").write_text(json.dumps(data))
    assert [s.kernels for s in read_plan(tmp_path / "p.json").stages] == [s.kernels for s in plan.stages]
    old = json.loads(json.dumps(data))
    for st in old["stages"]:
        del st["kernels"]
    legacy = from_dict(old)
    assert all(dict(s.kernels) == {b: "fp16" if b == 16 else "torch" for b in set(s.bits)} for s in legacy.stages)
    bad = json.loads(json.dumps(data))
    bad["stages"][0]["kernels"] = {str(plan.stages[0].bits[0]): "cutlass"}
    with pytest.raises(PlanError, match=r"stages\[0\]\.kernels\.\d+: unknown kernel 'cutlass'"):
        from_dict(bad, "p.json")
    bad["stages"][0]["kernels"] = {"99": "torch"}
    with pytest.raises(PlanError, match=r"stages\[0\]\.kernels: expected one kernel for each of bits"):
        from_dict(bad, "p.json")
    assert to_dict(read_plan(tmp_path / "p.json")) == data


def test_kernel_choice_is_the_least_busy_time_and_estimate_keeps_a_given_kernel(tmp_path):
    exp, ctx, _ = paper("paper-c3", tmp_path)
    # T4 at 4 bits: Marlin for a small decode micro-batch
    assert choose_kernel(ctx, "t4", 4, 1, 16) == "marlin"
    forced = [StageAssignment("t4", "n0", 0, 24, (4,) * 24, {4: "exllama"}),
              StageAssignment("v100-32g", "n1", 24, 48, (4,) * 24)]
    e = estimate(ctx, forced, 1, 16)
    assert e.stages[0].kernels == ((4, "exllama"),) and e.stages[1].kernels == ((4, "exllama"),)
    free = estimate(ctx, [replace(forced[0], kernels=()), forced[1]], 1, 16)
    assert free.stages[0].kernels == ((4, "marlin"),) and free.throughput_tok_s > e.throughput_tok_s
    with pytest.raises(ValueError, match="kernel 'marlin' cannot run 4-bit layers on device v100-32g"):
        estimate(ctx, [forced[0], replace(forced[1], kernels={4: "marlin"})], 1, 16)


# ---------------------------------------------------------------- uniform-best


def test_memory_balanced_counts_by_hand():
    assert memory_balanced_counts([10.0, 20.0, 10.0], [100, 100, 100], 8) == (2, 4, 2)
    assert memory_balanced_counts([10.0, 20.0, 10.0], [1, 100, 100], 8) == (1, 5, 2)   # capped stage: the rest moves
    assert memory_balanced_counts([5.0, 5.0, 5.0], [3, 3, 3], 7) == (3, 2, 2)           # remainder to the first
    assert memory_balanced_counts([5.0, 5.0], [3, 3], 7) is None                        # does not fit
    assert memory_balanced_counts([5.0, 5.0], [0, 9], 7) is None                        # a stage holds nothing


def test_uniform_best_matches_brute_force(tmp_path):
    """Over every device order and every bit-width with a fast kernel on all devices: the memory-balanced plan with
    the highest exact throughput (ties: higher bits)."""
    exp, shape = small_experiment(layers=6, t4_room_gib=1.6, v100_room_gib=3.0, bits=(16, 8, 4, 3))
    ctx = build_context(exp, tmp_path, shape=shape)
    omega = proxy_omega(ctx.shape, (16, 8, 4, 3))
    cache, settings = CostCache(ctx), SearchSettings()
    got = uniform_best(cache, omega, settings).candidate
    b = math.ceil(ctx.workload.batch / 3)
    assert (got.b_p, got.b_d) == (b, b)
    assert fast_common_bits(cache, omega.bits) == (16, 4)        # V100: no fast 8-bit kernel (no Marlin)
    best = None
    for slots in full_orders(ctx.cluster):
        tb = build_tables(cache, slots, b, b, omega)
        for bits in (16, 4):
            c = tb.bits.index(bits)
            free = tb.capacity - tb.fixed_mem - tb.workspace[:, c]
            caps = ((free // tb.mem_bytes[0, :, c]).clip(0)).astype(int)
            counts = memory_balanced_counts(free, caps, 6)
            if counts is None:
                continue
            starts = [sum(counts[:j]) for j in range(len(counts))]
            stages = [StageAssignment(stem, node, a, a + n, (bits,) * n)
                      for (node, stem), a, n in zip(slots, starts, counts)]
            e = estimate(ctx, stages, b, b)
            if e.fits and (best is None or (e.throughput_tok_s, bits) > best[:2]):
                best = (e.throughput_tok_s, bits, stages)
    assert best is not None
    assert estimate(ctx, got.stages, b, b).throughput_tok_s == pytest.approx(best[0])
    assert set(got.bits) == {best[1]}


def test_uniform_best_gives_the_embedding_and_head_stages_fewer_layers(tmp_path):
    exp, ctx, omega = paper("paper-c11", tmp_path)     # 4 x A100-80G, BLOOM-176B (a 7 GB embedding)
    plan = uniform_best(CostCache(ctx), omega, SearchSettings()).candidate
    counts = [s.end - s.start for s in plan.stages]
    assert counts[0] < max(counts[1:-1]) and counts[-1] <= max(counts[1:-1])
    assert len(set(plan.bits)) == 1


def test_uniform_best_is_a_budget_source_and_in_the_default_experiments(tmp_path):
    exp, ctx, omega = paper("paper-c3", tmp_path, budget_from="uniform-best")
    base = solve(replace(exp, solver=replace(exp.solver, name="uniform-best", method="uniform-best",
                                             budget_from=None)), tmp_path, ctx=ctx, omega=omega).plan
    fair = solve(exp, tmp_path, ctx=ctx, omega=omega).plan
    assert fair.omega <= base.omega * (1 + 1e-9) and fair.throughput_tok_s >= base.throughput_tok_s * (1 - 1e-9)
    assert compose_experiment(["solver=uniform-best"]).solver.method == "uniform-best"
    default = compose_experiment([])
    assert "uniform-best" in default.raw["experiments"][0]["solvers"]


# ---------------------------------------------------------------- message buffers


def test_buffers_count_what_the_runtime_posts():
    exp, shape = small_experiment()
    t4 = exp.devices["t4"]
    w = WorkloadSpec("w", prompt_len=32, gen_len=4, batch=12)
    h, d = shape.hidden, 2
    # b_p = 2 (K_p = 6), b_d = 4 (K_d = 3): two prefill receives/sends of 2·32 rows are the largest
    middle = buffers_bytes(shape, t4, w, 2, 4, first=False, last=False)
    assert middle == 2 * (POSTED_MESSAGES * 2 * 32 * h * d)
    first = buffers_bytes(shape, t4, w, 2, 4, first=True, last=False)
    assert first == 12 * 8 + POSTED_MESSAGES * 2 * 32 * h * d          # token receives for all 12 sequences
    last = buffers_bytes(shape, t4, w, 2, 4, first=False, last=True)
    assert last == POSTED_MESSAGES * 2 * 32 * h * d + POSTED_MESSAGES * 4 * 8
    assert buffers_bytes(shape, t4, w, 12, 12, first=True, last=True) == 0   # one stage: no messages
    one = buffers_bytes(shape, t4, w, 12, 1, first=False, last=False)       # K_p = 1: one prefill message
    assert one == 2 * 12 * 32 * h * d
