"""Layer grouping and its refinement: how coarse a branch's per-item MILP is, and re-solving it per layer.

Where ω differs by layer the MILP needs one item per layer (G·N·|bits| binaries); above `item_cells` binaries,
consecutive layers are grouped into runs of k (`tables.grouped_items`), every layer of a run sharing a stage
and a bit-width. A grouped solution is a valid plan, but a coarse one.

Refinement re-solves it per layer, in a neighbourhood of the current solution (a large-neighbourhood step):
every layer may take any bit-width its stage's device runs, and a layer within `refine_window` layers of a stage
boundary may also move to the neighbouring stage; every other layer stays on its stage. The model has about
L·|bits| binaries instead of L·N·|bits|, the current solution is one of its solutions and its warm start, so
the result is never worse; rounds repeat around the new solution (`refine_rounds`) while one improves it and
the deadline allows. The same step moves a plan to another micro-batch pair of its device order (where its
layout may not fit: then the warm start is only the neighbourhood's centre). The plan then has per-layer granularity, found near the grouped one: the gap is still
against the per-layer bound over all branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .limits import Deadline, SearchSettings
from .milp import MilpOptions, solve_branch
from .quality import OmegaTable
from .tables import (Assignment, CostCache, ProblemTables, build_tables, default_items, from_stages, grouped_items,
                     omega_of, surrogate_ms, to_stages, violations)


def layer_uniform(omega: OmegaTable) -> bool:
    """Whether every layer has the same ω row (then layers are interchangeable and never need grouping)."""
    return bool(np.all(omega.values == omega.values[0]))


def group_size(layers: int, bits: int, stages: int, cells: int) -> int:
    """The least k with ⌈L/k⌉·N·|bits| ≤ cells (1 when single layers fit)."""
    size = bits * stages * layers
    return 1 if size <= cells else math.ceil(size / cells)


def branch_items(layers: int, omega: OmegaTable, stages: int, cells: int) -> tuple[tuple[int, int], ...]:
    """Per-layer items, or groups of consecutive layers when the per-item model would be too large."""
    if layer_uniform(omega):
        return default_items(layers)
    return grouped_items(layers, group_size(layers, len(omega.bits), stages, cells))


def layers_per_item(tb: ProblemTables) -> int:
    """The granularity of a branch's tables: the most layers one item holds."""
    return int(tb.sizes.max())


def neighbourhood(tb: ProblemTables, a: Assignment, window: int) -> np.ndarray:
    """The mask [G, N, C] of the per-item tables `tb` around assignment `a` (module docstring)."""
    G, N = tb.n_items, tb.n_stages
    mask = np.zeros((G, N, tb.n_bits), dtype=bool)
    stage = np.asarray(a.stage)
    for g in range(G):
        reach = {int(stage[g])}
        lo, hi = max(0, g - window), min(G, g + window + 1)
        reach.update(int(j) for j in stage[lo:hi])  # a stage boundary within the window: both sides
        for j in reach:
            mask[g, j] = tb.allowed[j]
    mask[0] = False
    mask[0, 0] = tb.allowed[0]          # the first layer stays on the first stage, the last on the last
    mask[G - 1] = False
    mask[G - 1, N - 1] = tb.allowed[N - 1]
    return mask


@dataclass(frozen=True)
class Refined:
    """The refined solution: its per-layer tables, assignment, objective value, the MILPs run, and the rounds that
    improved it."""

    tables: ProblemTables
    assignment: Assignment
    objective: float
    milps: int
    improved: int


def refine(cache: CostCache, tb: ProblemTables, a: Assignment, omega: OmegaTable, settings: SearchSettings,
           deadline: Deadline, objective: str = "time") -> Refined:
    """Re-solve a grouped solution per layer around itself (module docstring). Objective "time" (the surrogate,
    under the tables' budget) or "omega" (Σω)."""
    fine = build_tables(cache, tb.slots, tb.b_p, tb.b_d, omega, budget=tb.budget, theta=tb.theta,
                        decode_points=settings.decode_points)
    a = from_stages(fine, to_stages(tb, a))
    score = surrogate_ms if objective == "time" else omega_of
    value = math.inf if violations(fine, a) else score(fine, a)  # a plan moved to other micro-batches may not fit
    milps, improved = 0, 0
    for _ in range(settings.refine_rounds):
        if deadline.expired(margin=0.05):
            break
        masked = replace(fine, mask=neighbourhood(fine, a, settings.refine_window))
        result = solve_branch(masked, MilpOptions(backend=settings.backend, time_limit_s=deadline.milp_seconds(),
                                                  node_limit=settings.refine_node_limit, rel_gap=settings.rel_gap,
                                                  warm=a, sub_mips=False), objective)
        milps += 1
        if result.assignment is None or result.objective >= value * (1 - 1e-9):
            break
        a, value, improved = result.assignment, float(result.objective), improved + 1
    return Refined(fine, a, value, milps, improved)
