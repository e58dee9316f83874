"""Solver: the MILP against brute force (synthetic tables and the real cost model), bounds, baselines, errors."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import replace

import numpy as np
import pytest

from llmpq.config import ClusterSpec, compose_experiment
from llmpq.config.types import Node, WorkloadSpec
from llmpq.costmodel.context import build_context
from llmpq.costmodel.estimate import StageAssignment, estimate, stage_time_ms
from llmpq.costmodel.memory import load_workspace_bytes
from llmpq.costmodel.pipeline import PhaseTimes, decode_surrogate_ms, micro_batches, prefill_ms
from llmpq.models.shape import shape_from_config
from llmpq.solve.baselines import adabits, pipeedge, uniform
from llmpq.solve.bounds import StemArrays, micro_batch_sizes, order_bounds
from llmpq.solve.errors import BudgetInfeasible, MemoryInfeasible
from llmpq.solve.heuristic import heuristic_assignment
from llmpq.solve.milp import MilpOptions, count_lp_bound, solve_branch
from llmpq.solve.orders import all_orders, device_orders, node_block_orders
from llmpq.solve.partition import min_max_counts
from llmpq.solve.plan import to_json
from llmpq.solve.planner import solve
from llmpq.solve.quality import OmegaTable, budget_from_spec, proxy_omega
from llmpq.solve.limits import SearchSettings
from llmpq.solve.tables import (Assignment, CostCache, ProblemTables, build_tables, omega_of, stage_bytes,
                                surrogate_ms, violations)

EXACT = MilpOptions(rel_gap=1e-9, time_limit_s=60)


# ---------------------------------------------------------------- synthetic tables


def synthetic(seed: int, items: int = 5, stages: int = 3, budget: float = math.inf, theta: float = 0.0,
              uniform_omega: bool = False, k_p: int = 3, k_d: int = 2, workspace: bool = False) -> ProblemTables:
    """Random numeric tables: heterogeneous stages, 3 bit-widths, layer-varying ω, binding memory; with `workspace`,
    the two quantized columns' kernels hold a workspace per stage (different sizes), counted once per stage."""
    rng = np.random.default_rng(seed)
    C, P = 3, 3
    speed = rng.uniform(0.5, 2.0, stages)
    per_bits_p = np.asarray([1.0, 1.1, 1.2])
    per_bits_d = np.asarray([1.0, 0.6, 0.4])
    t_p = np.broadcast_to(speed[:, None] * per_bits_p[None, :] * 10, (items, stages, C)).copy()
    ctx_growth = np.asarray([1.0, 1.05, 1.1])
    t_d = np.broadcast_to((speed[:, None] * per_bits_d[None, :])[..., None] * ctx_growth, (items, stages, C, P)).copy()
    mem = np.broadcast_to(np.asarray([4.0, 2.0, 1.0]), (items, stages, C)).copy()
    om = np.ones((items, C)) if uniform_omega else rng.uniform(0.5, 2.0, (items, 1))
    om = om * np.asarray([0.0, 0.1, 1.0])
    return ProblemTables(
        slots=tuple((f"n{j % 2}", f"d{j}") for j in range(stages)), b_p=1, b_d=1, k_p=k_p, k_d=k_d,
        bits=(16, 8, 4), items=tuple((i, i + 1) for i in range(items)), allowed=np.ones((stages, C), bool),
        kernels=(("fp16", "marlin", "torch"),) * stages,
        workspace=(np.outer(rng.uniform(0.5, 2.0, stages), [0.0, 0.4, 1.0]) if workspace
                   else np.zeros((stages, C))),
        t_prefill=t_p, t_decode=t_d, mem_bytes=mem, omega=om,
        fixed_prefill=rng.uniform(0, 3, stages), fixed_decode=rng.uniform(0, 0.5, stages),
        comm_prefill=rng.uniform(0, 5, stages), comm_decode=rng.uniform(0, 0.3, stages),
        fixed_mem=rng.uniform(0, 1, stages), capacity=rng.uniform(5, 9, stages) + 1.0,
        points=(1, 3, 5), cycle_weights=np.asarray([1.5, 2.0, 0.5]), budget=budget, theta=theta)


def all_assignments(tb: ProblemTables):
    """Every contiguous assignment (all stages used, in order) with every bit column per item."""
    G, N, C = tb.n_items, tb.n_stages, tb.n_bits
    for cuts in itertools.combinations(range(1, G), N - 1):
        bounds = (0,) + cuts + (G,)
        stage = tuple(j for j in range(N) for _ in range(bounds[j], bounds[j + 1]))
        for column in itertools.product(range(C), repeat=G):
            yield Assignment(stage, column)


def brute_force(tb: ProblemTables) -> float:
    best = math.inf
    for a in all_assignments(tb):
        if not violations(tb, a):
            best = min(best, surrogate_ms(tb, a))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [math.inf, 2.0])
def test_milp_matches_brute_force_on_synthetic_tables(seed, budget):
    tb = synthetic(seed, budget=budget)
    result = solve_branch(tb, EXACT)
    expected = brute_force(tb)
    if math.isinf(expected):
        assert result.assignment is None and result.status == "infeasible"
        return
    assert result.status == "optimal"
    assert result.objective == pytest.approx(expected, rel=1e-7)
    assert not violations(tb, result.assignment)
    assert count_lp_bound(tb) <= expected * (1 + 1e-9)  # ω differs by layer: the relaxed LP still bounds
    assert result.bound <= result.objective * (1 + 1e-7)


@pytest.mark.parametrize("seed", range(6))
def test_milp_counts_the_largest_kernel_workspace_once_per_stage(seed):
    """Stages pay the largest workspace of the columns they use (never the sum, never an unused one): the MILP, its
    count form and brute force over the tables' own memory rule agree."""
    tb = synthetic(seed, workspace=True)
    expected = brute_force(tb)
    result = solve_branch(tb, EXACT)
    if math.isinf(expected):
        assert result.assignment is None
        return
    assert result.objective == pytest.approx(expected, rel=1e-7)
    assert not violations(tb, result.assignment)
    uniform = replace(synthetic(seed, items=6, uniform_omega=True, workspace=True), budget=3.0)
    assert solve_branch(uniform, EXACT).objective == pytest.approx(brute_force(uniform), rel=1e-7)
    a = Assignment((0, 0, 1, 1, 2), (1, 2, 0, 0, 1))
    work = np.asarray([tb.workspace[0, 2], 0.0, tb.workspace[2, 1]])
    assert stage_bytes(tb, a) == pytest.approx(tb.fixed_mem + work + [tb.mem_bytes[0, 0, 1] + tb.mem_bytes[1, 0, 2],
                                                                      2 * tb.mem_bytes[2, 1, 0], tb.mem_bytes[4, 2, 1]])


@pytest.mark.parametrize("seed", range(2))
def test_cbc_backend_agrees(seed):
    tb = synthetic(seed, budget=2.0)
    cbc = solve_branch(tb, replace(EXACT, backend="cbc"))
    assert cbc.status == "optimal"
    assert cbc.objective == pytest.approx(solve_branch(tb, EXACT).objective, rel=1e-6)


def test_single_token_generation_has_no_decode_term():
    tb = replace(synthetic(2), points=(), cycle_weights=np.zeros(1), t_decode=np.zeros((5, 3, 3, 1)))
    result = solve_branch(tb, EXACT)
    assert result.objective == pytest.approx(brute_force(tb), rel=1e-7)


def test_soft_quality_penalty_is_part_of_the_objective():
    tb = synthetic(3, theta=25.0)
    result = solve_branch(tb, EXACT)
    assert result.objective == pytest.approx(brute_force(tb), rel=1e-7)
    plain = solve_branch(synthetic(3), EXACT)
    assert omega_of(tb, result.assignment) <= omega_of(tb, plain.assignment) + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_count_model_equals_per_item_model_when_items_are_interchangeable(seed):
    tb = synthetic(seed, items=6, budget=3.0, uniform_omega=True)
    counts = solve_branch(tb, EXACT)
    per_item = solve_branch(tb, replace(EXACT, aggregate=False))
    assert counts.objective == pytest.approx(per_item.objective, rel=1e-7)
    assert counts.objective == pytest.approx(brute_force(tb), rel=1e-7)


def test_omega_objective_finds_the_least_omega():
    tb = synthetic(5)
    got = solve_branch(tb, EXACT, objective="omega")
    least = min(omega_of(tb, a) for a in all_assignments(tb) if not violations(tb, a))
    assert got.objective == pytest.approx(least, abs=1e-12)


def test_cutoff_reports_no_solution_and_a_valid_bound():
    tb = synthetic(1)
    best = solve_branch(tb, EXACT).objective
    cut = solve_branch(tb, replace(EXACT, cutoff=best * 0.99))
    assert cut.assignment is None and cut.bound >= best * 0.99 - 1e-6


def test_heuristic_plans_are_valid():
    for seed in range(6):
        tb = synthetic(seed, budget=3.0, uniform_omega=True)
        a = heuristic_assignment(tb)
        if a is not None:
            assert not violations(tb, a)
            assert surrogate_ms(tb, a) >= brute_force(tb) - 1e-9


def test_min_max_partition_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n, layers = int(rng.integers(1, 4)), int(rng.integers(3, 9))
        fixed, per = rng.uniform(0, 5, n), rng.uniform(0.5, 3, n)
        cap = rng.integers(1, layers, n)
        got = min_max_counts(fixed, per, cap, layers)
        best = None
        for counts in itertools.product(*(range(1, c + 1) for c in cap)):
            if sum(counts) == layers:
                value = max(f + k * p for f, k, p in zip(fixed, counts, per))
                best = value if best is None else min(best, value)
        if best is None:
            assert got is None
        else:
            assert sum(got) == layers and all(1 <= k <= c for k, c in zip(got, cap))
            assert max(f + k * p for f, k, p in zip(fixed, got, per)) == pytest.approx(best)


# ---------------------------------------------------------------- a small real instance


def small_experiment(layers: int = 3, t4_room_gib: float = 0.75, v100_room_gib: float = 1.6, gen_len: int = 4,
                     bits: tuple[int, ...] = (16, 8, 4)):
    """3 devices (2 T4 on n0, 1 V100 on n1) with little memory, an OPT layer of hidden 4096, B = 4, n = 4."""
    base = compose_experiment(["model=opt-30b", "cluster=paper-c3", "workload=s512-n100-b32"])
    devices = {stem: replace(spec, memory_gib=spec.reserve_gib + room)
               for (stem, spec), room in zip(sorted(base.devices.items()), (t4_room_gib, v100_room_gib))}
    cluster = ClusterSpec("small3", (Node("n0", (("t4", 2),)), Node("n1", (("v100-32g", 1),))), False,
                          base.cluster.intra_node, base.cluster.inter_node)
    workload = WorkloadSpec("w-s32-n4-b4", prompt_len=32, gen_len=gen_len, batch=4)
    exp = replace(base, cluster=cluster, devices=devices, workload=workload, model=replace(base.model, bits=bits))
    shape = shape_from_config({"model_type": "opt", "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": layers,
                               "num_attention_heads": 32, "vocab_size": 50272, "max_position_embeddings": 2048})
    return exp, shape


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    exp, shape = small_experiment()
    ctx = build_context(exp, tmp_path_factory.mktemp("results"), shape=shape)
    return exp, ctx


def brute_force_plans(ctx, omega: OmegaTable):
    """Every plan of the instance: distinct device sequences (from permutations of the slots, not `orders`),
    contiguous partitions, per-layer bits, micro-batch pairs; yields (slots, b_p, b_d, stages)."""
    slots = ctx.cluster.device_slots()
    sequences = sorted({seq for n in range(1, len(slots) + 1) for seq in itertools.permutations(slots, n)})
    L = ctx.shape.num_layers
    sizes = micro_batch_sizes(ctx.workload.batch)
    for seq in sequences:
        for cuts in itertools.combinations(range(1, L), len(seq) - 1):
            bounds = (0,) + cuts + (L,)
            for bits in itertools.product(omega.bits, repeat=L):
                stages = tuple(StageAssignment(stem, node, bounds[j], bounds[j + 1], bits[bounds[j]:bounds[j + 1]])
                               for j, (node, stem) in enumerate(seq))
                if any(b not in ctx.devices[s.device].bits for s in stages for b in s.bits):
                    continue
                for b_p in sizes:
                    for b_d in sizes:
                        yield seq, b_p, b_d, stages


@pytest.mark.parametrize("budget", [None, 0.8])
def test_search_matches_brute_force_under_the_cost_model(small, budget, tmp_path):
    """With n − 1 ≤ decode_points the surrogate is exact, so surrogate and exact optimum coincide."""
    exp, ctx = small
    omega = proxy_omega(ctx.shape, (16, 8, 4))
    budget_value = math.inf if budget is None else budget
    cache = CostCache(ctx)
    best_surrogate, best_exact, feasible_plans = math.inf, 0.0, 0
    for seq, b_p, b_d, stages in brute_force_plans(ctx, omega):
        bits = tuple(b for s in stages for b in s.bits)
        if omega.total(bits) > budget_value * (1 + 1e-9):
            continue
        e = estimate(ctx, stages, b_p, b_d)
        if not e.fits:
            continue
        feasible_plans += 1
        tb = build_tables(cache, seq, b_p, b_d, omega, budget=budget_value)
        a = Assignment(tuple(j for j, s in enumerate(stages) for _ in s.bits),
                       tuple(tb.bits.index(b) for b in bits))
        assert not violations(tb, a)
        best_surrogate = min(best_surrogate, surrogate_ms(tb, a))
        best_exact = max(best_exact, e.throughput_tok_s)
    assert feasible_plans > 10
    solver = replace(exp.solver, max_omega=budget, default_budget=None)
    out = solve(replace(exp, solver=solver), tmp_path, ctx=ctx, omega=omega)
    assert out.plan.status == "optimal"
    assert out.plan.objective == pytest.approx(best_surrogate, rel=1e-6)
    assert out.plan.throughput_tok_s == pytest.approx(best_exact, rel=1e-9)
    assert out.plan.omega <= budget_value * (1 + 1e-9)
    assert out.estimate.fits


def test_bounds_never_exceed_a_branch_optimum(small):
    exp, ctx = small
    omega = proxy_omega(ctx.shape, (16, 8, 4))
    cache = CostCache(ctx)
    settings = SearchSettings()
    from llmpq.costmodel.pipeline import surrogate_cycle_weights, surrogate_points

    points = surrogate_points(ctx.workload.gen_len, 3)
    weights = dict(surrogate_cycle_weights(ctx.workload.gen_len, 3))
    arrays = StemArrays(cache, omega.bits, points)
    for budget in (math.inf, 0.8):
        for seq in device_orders(ctx.cluster, ctx.shape.num_layers):
            bounds = [order_bounds(arrays, seq, ctx.shape.num_layers, [weights.get(k, 0.0) for k in points],
                                   omega.values.min(axis=0), budget, full=full) for full in (False, True)]
            for i, b_p in enumerate(bounds[0].prefill_sizes):
                for k, b_d in enumerate(bounds[0].decode_sizes):
                    tb = build_tables(cache, seq, b_p, b_d, omega, budget=budget, decode_points=settings.decode_points)
                    result = solve_branch(tb, EXACT)
                    if result.assignment is None:
                        continue
                    for pb in bounds:
                        assert pb.lower[i, k] <= result.objective * (1 + 1e-9), (seq, b_p, b_d, budget)
                    assert count_lp_bound(tb) <= result.objective * (1 + 1e-9)


def test_surrogate_of_tables_equals_pipeline_composition(small):
    """tables.surrogate_ms = prefill_ms + decode_surrogate_ms of the estimator's own stage times."""
    exp, ctx = small
    omega = proxy_omega(ctx.shape, (16, 8, 4))
    w = replace(ctx.workload, gen_len=40)
    ctx40 = replace(ctx, workload=w)
    seq = (("n0", "t4"), ("n1", "v100-32g"))
    stages = (StageAssignment("t4", "n0", 0, 1, (8,)), StageAssignment("v100-32g", "n1", 1, 3, (16, 4)))
    tb = build_tables(CostCache(ctx40), seq, 2, 1, omega)
    a = Assignment((0, 1, 1), (1, 0, 2))
    e = estimate(ctx40, stages, 2, 1)

    def phase(name, batch, context):
        return tuple(stage_time_ms(ctx40, s, name, batch, context, first=j == 0, last=j == 1)
                     for j, s in enumerate(stages))

    pre = PhaseTimes(phase("prefill", 2, w.prompt_len), e.comm_prefill_ms)
    expected = prefill_ms(pre, micro_batches(w.batch, 2)) + decode_surrogate_ms(
        lambda k: PhaseTimes(phase("decode", 1, w.prompt_len + k), e.comm_decode_ms), w.gen_len,
        micro_batches(w.batch, 1), 3)
    assert surrogate_ms(tb, a) == pytest.approx(expected, rel=1e-9)
    # the tables count the run-time peak; the exact estimate also Marlin's load-time repack where it is larger
    # (stage 0: one 8-bit layer beside the embedding, whose KV cache and activations are smaller than a repack)
    exact = [m.total_bytes for m in e.memory]
    assert stage_bytes(tb, a)[1] == pytest.approx(exact[1]) and stage_bytes(tb, a)[0] <= exact[0]
    m0 = e.memory[0]
    repack = load_workspace_bytes(ctx.shape, {8: ctx.latency.kernels.spec(e.stages[0].kernel_map[8])})
    load = m0.weights_bytes + m0.embed_bytes + m0.head_bytes + m0.reserve_bytes + repack
    assert exact[0] == pytest.approx(max(stage_bytes(tb, a)[0], load))


def test_plans_fit_memory_and_budget_and_are_deterministic(small, tmp_path):
    exp, ctx = small
    omega = proxy_omega(ctx.shape, (16, 8, 4))
    for method, extra in [("llmpq", {}), ("llmpq", {"max_omega": 0.5}), ("llmpq", {"budget_from": "pipeedge"}),
                          ("pipeedge", {}), ("uniform", {}), ("adabits", {}), ("heuristic", {"max_omega": 1.0})]:
        spec = replace(exp.solver, name=method, method=method, **extra)
        first = solve(replace(exp, solver=spec), tmp_path, ctx=ctx, omega=omega)
        again = solve(replace(exp, solver=spec), tmp_path, ctx=build_context(exp, tmp_path, shape=ctx.shape),
                      omega=omega)
        assert to_json(first.plan) == to_json(again.plan), method
        assert first.estimate.fits and all(s.memory.total_bytes <= s.memory.capacity_bytes for s in first.plan.stages)
        if first.plan.budget is not None:
            assert first.plan.omega <= first.plan.budget * (1 + 1e-9)
        assert first.plan.plan_source == ("baseline" if method in ("pipeedge", "uniform", "adabits")
                                          else first.plan.plan_source)


def test_budget_from_baseline_is_never_worse_than_the_baseline(small, tmp_path):
    exp, ctx = small
    omega = proxy_omega(ctx.shape, (16, 8, 4))
    for base in ("pipeedge", "uniform", "adabits"):
        ref = solve(replace(exp, solver=replace(exp.solver, name=base, method=base)), tmp_path, ctx=ctx, omega=omega)
        fair = solve(replace(exp, solver=replace(exp.solver, budget_from=base)), tmp_path, ctx=ctx, omega=omega)
        assert fair.plan.throughput_tok_s >= ref.plan.throughput_tok_s * (1 - 1e-12)
        assert fair.plan.omega <= ref.plan.omega * (1 + 1e-9)
        assert fair.plan.budget == pytest.approx(ref.plan.omega)


def test_baselines_follow_their_rules(small):
    exp, ctx = small
    omega = proxy_omega(ctx.shape, (16, 8, 4))
    cache, settings = CostCache(ctx), SearchSettings()
    b = -(-ctx.workload.batch // 3)
    for made in (pipeedge(cache, omega, settings), uniform(cache, omega, settings)):
        c = made.candidate
        assert len(set(c.bits)) == 1 and len(c.stages) == 3 and c.b_p == c.b_d == b
    even = uniform(cache, omega, settings).candidate
    assert [s.end - s.start for s in even.stages] == [1, 1, 1]
    least = adabits(cache, omega, settings).candidate
    best = min(omega.total(tuple(x for s in stages for x in s.bits))
               for seq, bp, bd, stages in brute_force_plans(ctx, omega)
               if len(seq) == 3 and bp == bd == b and estimate(ctx, stages, bp, bd).fits and seq in
               set(itertools.permutations(ctx.cluster.device_slots())))
    assert omega.total(least.bits) == pytest.approx(best)


def test_memory_infeasible_names_need_and_room(tmp_path):
    exp, shape = small_experiment(t4_room_gib=0.05, v100_room_gib=0.1)
    ctx = build_context(exp, tmp_path, shape=shape)
    for method in ("llmpq", "pipeedge", "heuristic"):
        with pytest.raises(MemoryInfeasible,
                           match=r"model opt-30b with 3 layers needs [\d.]+ [KMG]iB at the lowest bits.*cluster small3 "
                                 r"has [\d.]+ [KMG]iB for it \([\d.]+ [KMG]iB less .*\); add devices"):
            solve(replace(exp, solver=replace(exp.solver, name=method, method=method)), tmp_path, ctx=ctx,
                  omega=proxy_omega(shape, (16, 8, 4)))


def test_budget_infeasible_names_the_least_omega(tmp_path):
    exp, shape = small_experiment(t4_room_gib=0.3, v100_room_gib=0.9)  # no room for 16-bit layers on the T4s
    ctx = build_context(exp, tmp_path, shape=shape)
    omega = proxy_omega(ctx.shape, (16, 8, 4))
    least = min(omega.total(tuple(b for s in stages for b in s.bits))
                for _, b_p, b_d, stages in brute_force_plans(ctx, omega) if estimate(ctx, stages, b_p, b_d).fits)
    assert least > 0
    with pytest.raises(BudgetInfeasible, match=r"smallest Σω that fits memory is ([\d.e-]+) \(") as err:
        solve(replace(exp, solver=replace(exp.solver, max_omega=least / 2)), tmp_path, ctx=ctx, omega=omega)
    assert float(re.search(r"fits memory is ([\d.e-]+)", str(err.value)).group(1)) == pytest.approx(least, rel=1e-5)
    assert solve(replace(exp, solver=replace(exp.solver, max_omega=least)), tmp_path, ctx=ctx, omega=omega).plan


def test_max_ppl_increase_needs_a_ppl_map(small, tmp_path):
    exp, ctx = small
    omega = proxy_omega(ctx.shape, (16, 8, 4))
    spec = replace(exp.solver, max_ppl_increase=1.0)
    with pytest.raises(ValueError, match="needs the model's ppl_map"):
        budget_from_spec(spec, omega, None)
    with pytest.raises(ValueError, match="needs the model's ppl_map"):
        solve(replace(exp, solver=spec), tmp_path, ctx=ctx, omega=omega)


def test_orders_break_symmetry_between_identical_devices(small):
    exp, ctx = small
    orders = all_orders(ctx.cluster, 3)
    assert len(orders) == len(set(orders)) == 2 + 3 + 3
    assert set(node_block_orders(ctx.cluster, 3)) <= set(orders)
    assert (("n0", "t4"), ("n1", "v100-32g"), ("n0", "t4")) not in node_block_orders(ctx.cluster, 3)


def test_micro_batch_sizes_cover_every_count():
    assert micro_batch_sizes(32) == (1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 32)
    assert {micro_batches(32, b) for b in micro_batch_sizes(32)} >= {1, 2, 3, 4, 8, 16, 32}
