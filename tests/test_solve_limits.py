"""One deadline for the whole solve, deterministic work limits, warm starts and per-layer refinement of grouped plans."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from llmpq.config import compose_experiment
from llmpq.costmodel.context import build_context
from llmpq.solve.baselines import adabits
from llmpq.solve.granularity import branch_items, group_size, neighbourhood, refine
from llmpq.solve.limits import Deadline, SearchSettings
from llmpq.solve.milp import HIGHS_OPTIONS, MilpOptions, _quiet_highs, solve_branch
from llmpq.solve.omega_min import least_omega_plan
from llmpq.solve.orders import full_orders
from llmpq.solve.partition import even_counts
from llmpq.solve.plan import to_json
from llmpq.solve.planner import solve
from llmpq.solve.quality import OmegaTable, proxy_omega, scaled_omega
from llmpq.solve.tables import (Assignment, CostCache, build_tables, from_stages, grouped_items, omega_of, surrogate_ms,
                                to_stages, violations)

PATTERN = (1.89, 0.14, 0.77, 1.21)  # a measured per-layer shape (tiny-opt, output_error at 4 bits, mean 1)


def paper_case(cluster: str = "paper-c3", tmp_path=None):
    """A paper cluster with its own model and first workload, its roofline context and a per-layer ω."""
    base = compose_experiment([f"cluster={cluster}"])
    exp = compose_experiment([f"cluster={cluster}", f"model={base.cluster.model}",
                              f"workload={base.cluster.workloads[0]}", "solver=llmpq"])
    ctx = build_context(exp, tmp_path)
    proxy = proxy_omega(ctx.shape, tuple(sorted(exp.model.bits, reverse=True)))
    return exp, ctx, scaled_omega(proxy, PATTERN)


@pytest.fixture(scope="module")
def c3(tmp_path_factory):
    return paper_case("paper-c3", tmp_path_factory.mktemp("results"))


def with_solver(exp, **changes):
    return replace(exp, solver=replace(exp.solver, default_budget=None, **changes))


def test_scaled_omega_interpolates_the_pattern_over_layers():
    base = OmegaTable((16, 4), np.column_stack([np.zeros(7), np.ones(7)]), "proxy")
    got = scaled_omega(base, (2.0, 0.0, 1.0))
    assert got.column(4).tolist() == pytest.approx([2.0, 4 / 3, 2 / 3, 0.0, 1 / 3, 2 / 3, 1.0])
    assert got.column(16).tolist() == [0.0] * 7 and got.source == "proxy"


def test_grouping_sizes_and_refinement_steps():
    assert group_size(48, 4, 4, 300) == 3 and group_size(10, 4, 2, 300) == 1
    uniform = OmegaTable((16, 4), np.ones((48, 2)), "proxy")
    assert len(branch_items(48, uniform, 8, 300)) == 48  # layer-uniform ω: never grouped (the count model)
    assert branch_items(48, scaled_omega(uniform, PATTERN), 8, 300) == grouped_items(48, 3)


def test_highs_runs_on_one_thread_with_a_fixed_seed():
    h = _quiet_highs()
    assert {k: h.getOptionValue(k)[1] for k in HIGHS_OPTIONS} == HIGHS_OPTIONS == {"threads": 1, "random_seed": 0}


def test_deadline_counts_from_its_start():
    started = time.monotonic() - 5.0
    assert Deadline.after(4.0, started).expired()
    assert 0.0 < Deadline.after(10.0, started).remaining() <= 5.0
    assert Deadline.after(0.0).milp_seconds() > 0  # a MILP always gets a positive limit


def test_warm_start_is_never_worse_and_refinement_keeps_a_valid_plan(c3):
    """A grouped solution is a solution of the per-layer model: warm-started from it, HiGHS returns one at least as
    good; the neighbourhood contains it; refinement returns a valid per-layer plan no worse than it."""
    exp, ctx, omega = c3
    cache = CostCache(ctx)
    slots = full_orders(ctx.cluster)[0]
    coarse = build_tables(cache, slots, 8, 8, omega, items=grouped_items(omega.num_layers, 4), budget=1.0)
    got = solve_branch(coarse, MilpOptions(node_limit=50))
    assert got.assignment is not None and not violations(coarse, got.assignment)
    fine = build_tables(cache, slots, 8, 8, omega, budget=1.0)
    warm = from_stages(fine, to_stages(coarse, got.assignment))
    assert surrogate_ms(fine, warm) == pytest.approx(got.objective)
    mask = neighbourhood(fine, warm, 2)
    assert all(mask[g, j, c] for g, (j, c) in enumerate(zip(warm.stage, warm.column)))
    assert mask.sum() < fine.allowed.sum() * fine.n_items  # a neighbourhood, not the whole model
    settings = SearchSettings(refine_rounds=1)
    refined = refine(cache, coarse, got.assignment, omega, settings, Deadline.after(60))
    assert refined.tables.n_items == omega.num_layers and not violations(refined.tables, refined.assignment)
    assert refined.objective <= got.objective * (1 + 1e-9)


def test_least_omega_with_per_layer_omega_fits_and_beats_the_probe(c3):
    exp, ctx, omega = c3
    cache = CostCache(ctx)
    orders = full_orders(ctx.cluster)
    found = least_omega_plan(cache, omega, orders, 8, 8, SearchSettings(), Deadline.after(60))
    assert found is not None and not violations(found.tables, found.assignment)
    assert found.status in ("feasible", "optimal")
    # no plan of a uniform bit-width on an even split of any order has a smaller Σω than what was found
    for slots in orders:
        tb = build_tables(cache, slots, 8, 8, omega)
        stage = tuple(j for j, n in enumerate(even_counts(omega.num_layers, len(slots))) for _ in range(n))
        for c in range(tb.n_bits):
            a = Assignment(stage, (c,) * len(stage))
            if not violations(tb, a):
                assert found.omega <= omega_of(tb, a) + 1e-12


def test_whole_solve_with_baseline_keeps_the_deadline(c3, tmp_path):
    """budget_from: adabits with per-layer ω: the baseline's MILPs and the search share one short deadline."""
    exp, ctx, omega = c3
    started = time.monotonic()
    limit = 1.5
    try:
        out = solve(with_solver(exp, budget_from="adabits", time_limit_s=limit), tmp_path, ctx=ctx, omega=omega,
                    started=started)
    except ValueError as exc:  # no plan at all within so little time is a message, not a hang
        assert "time_limit_s" in str(exc)
    else:
        assert out.plan.status in ("timeout", "feasible", "optimal")
        assert out.meta["deadline_hit"] == (out.plan.status == "timeout")
    assert time.monotonic() - started < limit + 1.0


@pytest.mark.slow
def test_same_plan_bytes_under_a_competing_cpu_load(c3, tmp_path):
    """paper-c3 (4 GPUs) with per-layer ω and budget_from: adabits, solved twice: once alone, once while two
    busy-loop processes compete for the CPU. The work limits, not the clock, end the solve: same bytes."""
    exp, ctx, omega = c3
    spec = with_solver(exp, budget_from="adabits", time_limit_s=60)
    first = solve(spec, tmp_path, ctx=ctx, omega=omega)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(2, os.cpu_count() or 2))]
    try:
        again = solve(spec, tmp_path, ctx=build_context(spec, tmp_path), omega=omega)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert first.plan.status != "timeout" and not first.meta["deadline_hit"]
    assert to_json(first.plan) == to_json(again.plan)
    assert first.plan.plan_source == "milp" and first.estimate.fits


def test_adabits_never_loses_its_least_omega_plan(c3):
    exp, ctx, omega = c3
    made = adabits(CostCache(ctx), omega, SearchSettings(), Deadline.after(60))
    assert made.candidate.source == "baseline" and made.status in ("feasible", "optimal")
    assert math.isfinite(made.candidate.surrogate_ms)
