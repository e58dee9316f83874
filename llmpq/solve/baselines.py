"""Baselines, built by their own rules and scored by the same cost model as `llmpq`.

All use every device of the cluster and b_p = b_d = ⌈B/N⌉ (N devices).

- `pipeedge`: uniform bits, the highest that fits; over every distinct order of the devices, the
  contiguous partition minimising the bottleneck stage's busy time (`heuristic.busy_tables`), exact
  by `partition.min_max_counts`; the best order wins (ties: the first).
- `uniform`: the cluster's file order (other orders only if nothing fits in it), an even split of the
  layers, the highest uniform bits that fit.
- `adabits`: the least Σω that fits memory (`omega_min`: a MILP with objective Σω), then, at that Σω, the
  fastest such plan by the surrogate (warm-started from the least-Σω plan, so never slower); over the first
  `ADABITS_ORDERS` distinct orders of the devices. Exact where ω is the same for every layer; where it differs
  by layer, the least Σω found within the work limits (status `feasible`).
- `uniform-best` (what a careful vLLM user does by hand): one bit-width for every layer, chosen among the
  bit-widths with a fast kernel (one that does not materialise the weight, `conf/kernels.yaml`) on every
  device of the cluster; a memory-balanced partition (`memory_balanced_counts`: layers in proportion to
  each stage's free memory at that bit-width, so the stages holding the embedding and the head get fewer);
  over the first `ADABITS_ORDERS` distinct device orders, the fitting (order, bit-width) with the highest
  exact predicted throughput wins (ties: the higher bit-width, then the earlier order). Where no such
  bit-width fits (a CPU runs only the materialising `torch` kernel, whose time is the dense GEMM's plus a
  dequantization, whatever the bits), the highest bit-width with a kernel everywhere that fits, as pipeedge
  would choose it, then the fastest order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmpq.costmodel.estimate import estimate

from .candidate import Candidate
from .errors import MemoryInfeasible, SolveTimeout
from .feasibility import MEMORY_ADVICE, memory_infeasible, memory_need_and_room, memory_report, over_text
from .heuristic import busy_tables
from .limits import Deadline, SearchSettings
from .methods import BASELINES
from .milp import MilpOptions, interchangeable, solve_branch
from .granularity import refine
from .omega_min import least_omega_plan
from .orders import full_orders
from .partition import even_counts, min_max_counts
from .quality import OmegaTable
from .tables import Assignment, CostCache, ProblemTables, Slot, build_tables, surrogate_ms, to_stages, violations

ADABITS_ORDERS = 24


@dataclass(frozen=True)
class BaselinePlan:
    """A baseline's plan with the status of its own construction (`optimal` where it solves its rule exactly)."""

    candidate: Candidate
    status: str
    gap: float | None


def baseline_micro_batch(batch: int, devices: int) -> int:
    """b_p = b_d = ⌈B/N⌉."""
    return -(-batch // devices)


def _tables(cache: CostCache, slots: tuple[Slot, ...], b: int, omega: OmegaTable, settings: SearchSettings,
            budget: float = math.inf) -> ProblemTables:
    return build_tables(cache, slots, b, b, omega, budget=budget, theta=settings.theta,
                        decode_points=settings.decode_points)


def _candidate(tb: ProblemTables, a: Assignment) -> Candidate:
    return Candidate(tb.slots, tb.b_p, tb.b_d, to_stages(tb, a), "baseline", surrogate_ms(tb, a))


def _uniform_assignment(counts: tuple[int, ...], column: int) -> Assignment:
    stage = tuple(j for j, n in enumerate(counts) for _ in range(n))
    return Assignment(stage, (column,) * len(stage))


def _layer_caps(tb: ProblemTables, column: int) -> np.ndarray:
    """Layers each stage can hold at one bit-width: ⌊(capacity − fixed − that kernel's workspace) / layer bytes⌋."""
    room = tb.capacity - tb.fixed_mem - tb.workspace[:, column]
    return np.floor(np.maximum(room, 0.0) / tb.mem_bytes[0, :, column]).astype(int)


def common_bits(tb: ProblemTables) -> list[int]:
    """Columns every stage's device supports, highest bits first."""
    return sorted((c for c in range(tb.n_bits) if tb.allowed[:, c].all()), key=lambda c: -tb.bits[c])


def pipeedge(cache: CostCache, omega: OmegaTable, settings: SearchSettings) -> BaselinePlan:
    """PipeEdge-style plan (module docstring)."""
    cluster, layers = cache.ctx.cluster, omega.num_layers
    b = baseline_micro_batch(cache.ctx.workload.batch, len(cluster.device_slots()))
    orders = full_orders(cluster)
    tables = [_tables(cache, o, b, omega, settings) for o in orders]
    for bits in sorted(omega.bits, reverse=True):
        best: tuple[float, int, tuple[int, ...]] | None = None
        for index, tb in enumerate(tables):
            if len(tb.slots) > layers or bits not in [tb.bits[c] for c in common_bits(tb)]:
                continue
            c = tb.bits.index(bits)
            fixed, per = busy_tables(tb)
            counts = min_max_counts(fixed, per[:, c], _layer_caps(tb, c), layers)
            if counts is None:
                continue
            value = float((fixed + np.asarray(counts) * per[:, c]).max())
            if best is None or value < best[0]:
                best = (value, index, counts)
        if best is not None:
            tb = tables[best[1]]
            return BaselinePlan(_candidate(tb, _uniform_assignment(best[2], tb.bits.index(bits))), "optimal", 0.0)
    raise memory_infeasible(cache, "pipeedge: ")


def uniform(cache: CostCache, omega: OmegaTable, settings: SearchSettings) -> BaselinePlan:
    """Even split, highest uniform bits that fit (module docstring)."""
    cluster, layers = cache.ctx.cluster, omega.num_layers
    b = baseline_micro_batch(cache.ctx.workload.batch, len(cluster.device_slots()))
    lowest = None
    for slots in full_orders(cluster):
        if len(slots) > layers:
            break
        tb = _tables(cache, slots, b, omega, settings)
        counts = even_counts(layers, len(slots))
        columns = common_bits(tb)
        for c in columns:
            a = _uniform_assignment(counts, c)
            if not violations(tb, a):
                return BaselinePlan(_candidate(tb, a), "optimal", 0.0)
        lowest = tb.bits[columns[-1]] if columns and lowest is None else lowest
    n = len(cluster.device_slots())
    need, room, _ = memory_need_and_room(cache)
    if n > layers or lowest is None or need > room:  # nothing fits at all: say that
        raise memory_infeasible(cache, "uniform: ")
    report = memory_report(cache, even_counts(layers, n), lowest, b)
    raise MemoryInfeasible(f"uniform: an even split of the {layers} layers at {lowest}-bit, the lowest bit-width every "
                           f"device runs, does not fit: {over_text(report) or 'stages exceed memory'}; "
                           f"{MEMORY_ADVICE}", report)


def adabits(cache: CostCache, omega: OmegaTable, settings: SearchSettings,
            deadline: Deadline | None = None) -> BaselinePlan:
    """Least Σω under memory only, then the fastest plan at that Σω (module docstring)."""
    deadline = deadline or Deadline.after(settings.time_limit_s)
    cluster = cache.ctx.cluster
    b = baseline_micro_batch(cache.ctx.workload.batch, len(cluster.device_slots()))
    least = least_omega_plan(cache, omega, full_orders(cluster)[:ADABITS_ORDERS], b, b, settings, deadline)
    if least is None:
        if deadline.expired():
            raise SolveTimeout(f"adabits: no plan found within solver.time_limit_s = {settings.time_limit_s:g} s; "
                               "raise it")
        raise memory_infeasible(cache, "adabits: ")
    budget = least.omega * (1 + 1e-9) + 1e-15
    tb = build_tables(cache, least.tables.slots, b, b, omega, items=least.tables.items, budget=budget,
                      theta=settings.theta, decode_points=settings.decode_points)
    a, status = least.assignment, least.status
    if deadline.expired():
        status = "timeout"
    elif interchangeable(tb):
        fast = solve_branch(tb, MilpOptions(backend=settings.backend, time_limit_s=deadline.milp_seconds(),
                                            node_limit=settings.node_limit, rel_gap=settings.rel_gap, warm=a))
        if fast.assignment is not None and surrogate_ms(tb, fast.assignment) <= surrogate_ms(tb, a):
            a = fast.assignment
        if status == "optimal" and fast.status != "optimal":
            status = "timeout" if fast.status == "timeout" else "feasible"
    else:  # per-layer ω: the fastest plan at that Σω near the least-Σω plan (stage boundaries move, bits as Σω allows)
        fast = refine(cache, tb, a, omega, settings, deadline)
        tb, a = fast.tables, fast.assignment
        status = "timeout" if deadline.expired() else status
    return BaselinePlan(_candidate(tb, a), status, 0.0 if status == "optimal" else None)


def fast_common_bits(cache: CostCache, bits: tuple[int, ...]) -> tuple[int, ...]:
    """Of `bits`, those every device of the cluster runs on a fast kernel, highest first."""
    ctx = cache.ctx
    table = ctx.latency.kernels
    out = []
    for b in sorted(bits, reverse=True):
        if all(any(table.spec(k).fast for k in ctx.latency.menu(stem).get(b, ())) for stem in ctx.cluster.device_stems()):
            out.append(b)
    return tuple(out)


def memory_balanced_counts(free: np.ndarray, caps: np.ndarray, layers: int) -> tuple[int, ...] | None:
    """Layer counts n_j ∝ free memory: quota_j = L·free_j / Σ free, n_j = ⌊quota_j⌋ within [1, cap_j], then single
    layers added where n_j < cap_j and quota_j − n_j is largest (removed where n_j > 1 and n_j − quota_j is
    largest) until Σ n_j = L (ties: the earlier stage). None when some cap_j < 1 or Σ cap_j < L."""
    free, caps = np.asarray(free, float), np.asarray(caps, int)
    if (caps < 1).any() or caps.sum() < layers or len(caps) > layers:
        return None
    quota = layers * free / free.sum()
    n = np.clip(np.floor(quota).astype(int), 1, caps)
    while n.sum() < layers:
        j = int(np.argmax(np.where(n < caps, quota - n, -np.inf)))
        n[j] += 1
    while n.sum() > layers:
        j = int(np.argmax(np.where(n > 1, n - quota, -np.inf)))
        n[j] -= 1
    return tuple(int(x) for x in n)


def uniform_best(cache: CostCache, omega: OmegaTable, settings: SearchSettings) -> BaselinePlan:
    """The fastest fitting single bit-width with a fast kernel everywhere, memory-balanced (module docstring)."""
    ctx, layers = cache.ctx, omega.num_layers
    cluster = ctx.cluster
    b = baseline_micro_batch(ctx.workload.batch, len(cluster.device_slots()))
    orders = [o for o in full_orders(cluster)[:ADABITS_ORDERS] if len(o) <= layers]
    tables = [_tables(cache, o, b, omega, settings) for o in orders]
    fast = fast_common_bits(cache, omega.bits)
    everywhere = tuple(bits for bits in sorted(omega.bits, reverse=True)
                       if all(bits in ctx.latency.menu(stem) for stem in cluster.device_stems()))
    for choice, highest_first in ((fast, False), (everywhere, True)):
        best: tuple[tuple, Candidate] | None = None
        for index, tb in enumerate(tables):
            for bits in choice:
                c = tb.bits.index(bits)
                free = tb.capacity - tb.fixed_mem - tb.workspace[:, c]
                counts = memory_balanced_counts(free, _layer_caps(tb, c), layers)
                if counts is None:
                    continue
                a = _uniform_assignment(counts, c)
                if violations(tb, a):
                    continue
                cand = _candidate(tb, a)
                throughput = estimate(ctx, cand.stages, b, b).throughput_tok_s
                key = (-bits, -throughput, index) if highest_first else (-throughput, -bits, index)
                if best is None or key < best[0]:
                    best = (key, cand)
        if best is not None:
            return BaselinePlan(best[1], "optimal", 0.0)
    raise memory_infeasible(cache, "uniform-best: ")


def run_baseline(method: str, cache: CostCache, omega: OmegaTable, settings: SearchSettings,
                 deadline: Deadline | None = None) -> BaselinePlan:
    """Dispatch by method name; only adabits runs MILPs, within `deadline` (the others are fast rules)."""
    if method == "adabits":
        return adabits(cache, omega, settings, deadline)
    makers = {"pipeedge": pipeedge, "uniform": uniform, "uniform-best": uniform_best}
    if method not in makers:
        raise ValueError(f"unknown baseline {method!r} (known: {', '.join(BASELINES)})")
    return makers[method](cache, omega, settings)

