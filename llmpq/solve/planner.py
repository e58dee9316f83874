"""Solve one experiment with its configured method and turn the winner into a Plan.

`llmpq`: the branch search (`search`, which also seeds itself with a heuristic plan), seeded with the
`budget_from` baseline's plan (Ω = its Σω; the plan is also a candidate); every candidate is re-scored exactly by
`costmodel.estimate` and the highest predicted throughput wins (ties: MILP before heuristic before
baseline, then a fixed order). `pipeedge`, `uniform`, `adabits`, `uniform-best`: their rules (`baselines`).
`heuristic`: the heuristic on the best-bounded branches. A solver config without a quality budget but with a
`default_budget` (shipped `llmpq`) takes its `max_ppl_increase` where the model has a ppl_map on the plan's
indicator, else its `budget_from`.

One deadline (`limits.Deadline`, `solver.time_limit_s` from `started`: the solve's start, or the `llmpq solve`
process's) covers the whole solve, baselines, `budget_from` and error wording included; the work limits
(`limits.SearchSettings`) stop it first on any machine. With `solver.engine` (vllm, sglang) every method plans
only the bit-widths that engine runs fast on each device (`llmpq.export.engine.restrict_devices`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmpq.config import Experiment, SolverSpec
from llmpq.config.dtypes import plan_dtype
from llmpq.costmodel.context import CostContext, build_context
from llmpq.costmodel.estimate import Estimate, estimate
from llmpq.export.engine import restrict_devices
from llmpq.models.source import hf_config_dict

from .baselines import run_baseline
from .candidate import Candidate
from .errors import BudgetInfeasible, MemoryInfeasible, NoCandidate, SolveTimeout
from .feasibility import budget_message, least_omega, memory_infeasible
from .limits import Deadline, SearchSettings
from .methods import BASELINES, METHODS
from .plan import Plan, StageMemoryPlan, StagePlan
from .quality import Budget, OmegaTable, budget_from_spec, load_omega, load_ppl_map_if_any, ppl_increase, ppl_map_applies
from .granularity import layer_uniform
from .search import heuristic_candidates, search
from .tables import CostCache

HEURISTIC_BRANCHES = 6
DEFAULT_FALLBACK = ("uniform-best", "pipeedge", "uniform", "adabits")  # strongest first
OMEGA_TOL = 1e-9


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    estimate: Estimate
    omega: float


@dataclass
class SolveOutcome:
    """The plan, its exact estimate, and the run's sidecar data (timings, counters: not part of the plan)."""

    plan: Plan
    estimate: Estimate
    meta: dict[str, Any] = field(default_factory=dict)


def settings_of(exp: Experiment) -> SearchSettings:
    s = exp.solver
    return SearchSettings(backend=s.backend, time_limit_s=float(s.time_limit_s), decode_points=int(s.decode_points),
                          theta=float(s.theta))


def _score(ctx: CostContext, omega: OmegaTable, c: Candidate) -> Scored:
    return Scored(c, estimate(ctx, c.stages, c.b_p, c.b_d), omega.total(c.bits))


def _best(scored: list[Scored], budget: float) -> Scored | None:
    ok = [s for s in scored if s.estimate.fits and s.omega <= budget * (1 + OMEGA_TOL) + OMEGA_TOL]
    if not ok:
        return None
    return min(ok, key=lambda s: (-s.estimate.throughput_tok_s, s.candidate.key()))


def effective_budget(spec: SolverSpec, omega: OmegaTable, ppl_map: Any) -> tuple[SolverSpec, bool]:
    """The solver config with its default quality budget applied where it gives none (module docstring), and
    whether the default was taken."""
    explicit = spec.max_ppl_increase is not None or spec.max_omega is not None or spec.budget_from is not None
    default = spec.default_budget
    if explicit or default is None:
        return spec, False
    if default.max_ppl_increase is not None and ppl_map_applies(ppl_map, omega):
        return replace(spec, max_ppl_increase=default.max_ppl_increase), True
    if default.budget_from is not None:
        return replace(spec, budget_from=default.budget_from), True
    return spec, False


def _budget(spec: SolverSpec, cache: CostCache, omega: OmegaTable, ppl_map: Any, settings: SearchSettings,
            deadline: Deadline) -> tuple[Budget, Candidate | None]:
    """Ω from the solver config; for budget_from, also that method's plan (a candidate of llmpq)."""
    source = spec.budget_from
    if source is None:
        return budget_from_spec(spec, omega, ppl_map), None
    if source == "llmpq":
        raise ValueError(f"solver/{spec.name}.yaml: budget_from: llmpq would measure a plan by itself")
    if source == "heuristic":
        found = heuristic_candidates(cache, omega, math.inf, settings, HEURISTIC_BRANCHES, deadline)
        if not found:
            raise _no_plan(cache, deadline, settings)
        plan = _best([_score(cache.ctx, omega, c) for c in found], math.inf).candidate
    else:
        plan = run_baseline(source, cache, omega, settings, deadline).candidate
    return budget_from_spec(spec, omega, ppl_map, omega.total(plan.bits)), plan


def _default_or_given_budget(spec: SolverSpec, defaulted: bool, cache: CostCache, omega: OmegaTable, ppl_map: Any,
                             settings: SearchSettings, deadline: Deadline) -> tuple[Budget, Candidate | None]:
    """`_budget`; a default `budget_from` whose baseline cannot fit memory falls back to the next baseline of
    `DEFAULT_FALLBACK` (the strongest available: adabits fits whenever any plan does)."""
    if not defaulted or spec.budget_from is None:
        return _budget(spec, cache, omega, ppl_map, settings, deadline)
    for source in [spec.budget_from] + [b for b in DEFAULT_FALLBACK if b != spec.budget_from]:
        try:
            return _budget(replace(spec, budget_from=source), cache, omega, ppl_map, settings, deadline)
        except MemoryInfeasible:
            continue
    raise memory_infeasible(cache)  # not even adabits fits: nothing does


def _no_plan(cache: CostCache, deadline: Deadline, settings: SearchSettings) -> ValueError:
    """Memory infeasibility, or a timeout when the deadline passed before anything could be decided."""
    if deadline.expired():
        return SolveTimeout(f"no plan found within solver.time_limit_s = {settings.time_limit_s:g} s: raise it")
    return memory_infeasible(cache)


def _budget_error(cache: CostCache, omega: OmegaTable, settings: SearchSettings, budget: Budget,
                  deadline: Deadline) -> BudgetInfeasible | MemoryInfeasible:
    least = least_omega(cache, omega, settings, deadline)
    if least is None and not deadline.expired():
        return memory_infeasible(cache)
    return BudgetInfeasible(budget_message(budget.omega, budget.source, least), _budget_report(budget, least))


def _budget_report(budget: Budget, least: tuple[float, str, bool] | None) -> dict[str, Any]:
    return {"budget": budget.omega, "budget_source": budget.source,
            "least_omega": None if least is None else least[0], "least_omega_plan": None if least is None else least[1]}


def solve_candidates(exp: Experiment, cache: CostCache, omega: OmegaTable, ppl_map: Any, settings: SearchSettings,
                     deadline: Deadline) -> tuple[list[Candidate], str, float | None, Budget, dict]:
    """Candidates of the configured method, with its status, gap, budget and counters."""
    method = exp.solver.method
    if method in BASELINES:
        if exp.solver.budget_from or exp.solver.max_omega is not None or exp.solver.max_ppl_increase is not None:
            raise ValueError(f"solver/{exp.solver.name}.yaml: the {method} baseline takes no quality budget")
        made = run_baseline(method, cache, omega, settings, deadline)
        return [made.candidate], made.status, made.gap, Budget(math.inf, "none"), {}
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    spec, defaulted = effective_budget(exp.solver, omega, ppl_map)
    budget, seed = _default_or_given_budget(spec, defaulted, cache, omega, ppl_map, settings, deadline)
    if defaulted:
        budget = replace(budget, source=f"{budget.source} (default)")
    if method == "heuristic":
        found = heuristic_candidates(cache, omega, budget.omega, settings, HEURISTIC_BRANCHES, deadline)
        if not found:
            if budget.bounded and not deadline.expired():
                raise _budget_error(cache, omega, settings, budget, deadline)
            raise _no_plan(cache, deadline, settings)
        return found, "timeout" if deadline.expired() else "feasible", None, budget, {}
    if budget.bounded and seed is None and layer_uniform(omega):
        # the least Σω is exact and cheap here, so an impossible budget fails fast (a budget_from seed meets its own)
        least = least_omega(cache, omega, settings, deadline)
        if least is not None and least[2] and least[0] > budget.omega * (1 + OMEGA_TOL) + OMEGA_TOL:
            raise BudgetInfeasible(budget_message(budget.omega, budget.source, least), _budget_report(budget, least))
    seeds = [seed] if seed is not None else []
    result = search(cache.ctx, omega, budget.omega, settings, seeds, deadline, cache)
    found = result.candidates + seeds
    if not found:
        if result.status == "timeout":
            raise _no_plan(cache, deadline, settings)
        if not result.memory_feasible:
            raise memory_infeasible(cache)
        if budget.bounded:
            raise _budget_error(cache, omega, settings, budget, deadline)
        raise memory_infeasible(cache)
    return found, result.status, result.gap, budget, dict(result.stats)


def solve(exp: Experiment, results: Path, *, ctx: CostContext | None = None, omega: OmegaTable | None = None,
          ppl_map: Any = None, indicator: str | None = None, started: float | None = None) -> SolveOutcome:
    """Plan the experiment (module docstring). `ctx`, `omega`, `ppl_map` default to what `results` holds:
    profiles and measured links, the sensitivity table (else the shape-only proxy), the ppl_map. `started`
    (a `time.monotonic()` value, default now) is when the deadline's clock started."""
    started = time.monotonic() if started is None else started
    settings = settings_of(exp)
    deadline = Deadline.after(settings.time_limit_s, started)
    ctx = ctx or build_context(exp, Path(results))
    if ppl_map is None:
        ppl_map = load_ppl_map_if_any(Path(results), exp.model.name)
    bits = tuple(sorted(exp.model.bits, reverse=True))
    if exp.solver.engine is not None:  # only the bit-widths that engine runs fast, per device
        ctx = replace(ctx, devices=restrict_devices(ctx.devices, exp.solver.engine, ctx.shape.layer.linears,
                                                    ctx.quant.group_size))
        bits = tuple(b for b in bits if any(b in d.bits for d in ctx.devices.values()))
    if omega is None:
        wanted = indicator or (getattr(ppl_map, "indicator", None) if ppl_map is not None else None)
        omega = load_omega(Path(results), exp.model.name, ctx.shape, bits, wanted, required=indicator is not None)
    if omega.num_layers != ctx.shape.num_layers:
        raise ValueError(f"ω table has {omega.num_layers} layers, model {exp.model.name} has {ctx.shape.num_layers}")
    cache = CostCache(ctx)
    found, status, gap, budget, stats = solve_candidates(exp, cache, omega, ppl_map, settings, deadline)
    best = _best([_score(ctx, omega, c) for c in found], budget.omega)
    if best is None:
        raise NoCandidate(f"none of the {len(found)} candidate plans fits memory and the budget under the exact cost "
                          f"model (the solver's memory rows missed a load-time peak); give the devices more room "
                          f"(memory_gib, reserve_gib) or shrink the workload's batch")
    plan = to_plan(exp, ctx, omega, ppl_map, best, status, gap, budget)
    meta = {"solve_s": time.monotonic() - started, "time_limit_s": settings.time_limit_s,
            "deadline_hit": status == "timeout", "candidates": len(found), "budget_source": budget.source,
            "omega_indicator": omega.indicator, **stats,
            "layers_per_item": best.candidate.layers_per_item, "refined_from": best.candidate.refined_from}
    return SolveOutcome(plan, best.estimate, meta)


def to_plan(exp: Experiment, ctx: CostContext, omega: OmegaTable, ppl_map: Any, best: Scored, status: str,
            gap: float | None, budget: Budget) -> Plan:
    """The Plan of the winning candidate."""
    c, e = best.candidate, best.estimate
    stages = tuple(StagePlan(
        device=s.device, node=s.node, start=s.start, end=s.end, bits=s.bits,
        memory=StageMemoryPlan(m.weights_bytes, m.kv_bytes, m.activations_bytes, m.embed_bytes, m.head_bytes,
                               m.buffers_bytes, m.reserve_bytes, m.capacity_bytes),
        prefill_ms=e.stage_prefill_ms[j], decode_ms=e.stage_decode_ms[j], kernels=s.kernels,
    ) for j, (s, m) in enumerate(zip(e.stages, e.memory)))
    profiled = all(ctx.latency.source(s.device) == "profile" for s in c.stages)
    return Plan(
        method=exp.solver.name, model=exp.model.name, cluster=exp.cluster.name, workload=exp.workload.name,
        quant_scheme=exp.model.quant.scheme, quant_group_size=exp.model.quant.group_size,
        micro_batch_prefill=c.b_p, micro_batch_decode=c.b_d, stages=stages,
        prefill_s=e.prefill_s, decode_s=e.decode_s, throughput_tok_s=e.throughput_tok_s,
        bottleneck_stage=e.bottleneck_stage, omega=best.omega, ppl_increase=ppl_increase(ppl_map, omega, best.omega),
        budget=budget.omega if budget.bounded else None,
        latency_source="profile" if profiled else "roofline", omega_source=omega.source,
        status=status, objective=c.surrogate_ms, gap=gap, plan_source=c.source,
        dtype=plan_dtype(exp.model.dtype, hf_config_dict(exp.model), [exp.devices[s.device] for s in c.stages]))
