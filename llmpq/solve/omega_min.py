"""The least Σω that fits memory over given device orders at one micro-batch pair: adabits' first step, and
the smallest Σω that the quality-budget error names.

Per order, a MILP with objective Σω and the memory rows (`milp`, objective "omega"). Where ω is the same for
every layer the count model is exact and cheap, and every order is solved. Where ω differs by layer, the
orders are first ranked by that count model with each bit-width's mean ω over the layers (the packing is
exact, Σω an estimate), the first `ranked_orders` are solved with grouped layers (`granularity`), and the best
is refined per layer around itself (`granularity.refine`): the result is the least Σω found (`feasible`), not
proven least.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .granularity import branch_items, layer_uniform, refine
from .limits import Deadline, SearchSettings
from .milp import MilpOptions, interchangeable, solve_branch
from .quality import OmegaTable
from .tables import Assignment, CostCache, ProblemTables, Slot, build_tables, omega_of

RANKED_ORDERS = 2


@dataclass(frozen=True)
class LeastOmega:
    """The least-Σω solution found: tables (at the granularity solved), assignment, Σω, status, MILPs run."""

    tables: ProblemTables
    assignment: Assignment
    omega: float
    status: str
    milps: int


def _mean_omega(omega: OmegaTable) -> OmegaTable:
    return OmegaTable(omega.bits, np.repeat(omega.values.mean(axis=0, keepdims=True), omega.num_layers, axis=0),
                      omega.source, omega.indicator)


def _options(settings: SearchSettings, deadline: Deadline, tb: ProblemTables) -> MilpOptions:
    limit = settings.node_limit if interchangeable(tb) else settings.item_node_limit
    return MilpOptions(backend=settings.backend, time_limit_s=deadline.milp_seconds(), node_limit=limit, rel_gap=1e-9)


def least_omega_plan(cache: CostCache, omega: OmegaTable, orders: Sequence[tuple[Slot, ...]], b_p: int, b_d: int,
                     settings: SearchSettings, deadline: Deadline,
                     ranked_orders: int = RANKED_ORDERS) -> LeastOmega | None:
    """The least Σω fitting memory over `orders` at (b_p, b_d) (module docstring); None when none fits (or the
    deadline passed before any order was solved). Ties: the earlier order."""
    layers = omega.num_layers
    orders = [o for o in orders if len(o) <= layers]
    uniform = layer_uniform(omega)
    probe = omega if uniform else _mean_omega(omega)
    found: list[tuple[float, int, ProblemTables, Assignment, str]] = []
    milps, status = 0, "optimal"
    for index, slots in enumerate(orders):
        if deadline.expired():
            status = "timeout"
            break
        tb = build_tables(cache, slots, b_p, b_d, probe, decode_points=settings.decode_points)
        result = solve_branch(tb, _options(settings, deadline, tb), objective="omega")
        milps += 1
        status = _worse(status, result.status)
        if result.assignment is not None:
            found.append((float(result.objective), index, tb, result.assignment, result.status))
    if not found:
        return None
    found.sort(key=lambda f: (f[0], f[1]))
    if uniform:
        value, _, tb, a, _ = found[0]
        return LeastOmega(tb, a, value, status, milps)
    best: tuple[float, int, ProblemTables, Assignment] | None = None
    status = "feasible"
    for _, index, probe_tb, probe_a, _ in found[:ranked_orders]:
        slots = orders[index]
        exact = build_tables(cache, slots, b_p, b_d, omega, decode_points=settings.decode_points)
        if best is None or omega_of(exact, probe_a) < best[0]:  # the probe's plan, scored with the real ω
            best = (omega_of(exact, probe_a), index, exact, probe_a)
        if deadline.expired():
            status = "timeout"
            continue
        items = branch_items(layers, omega, len(slots), settings.item_cells)
        tb = build_tables(cache, slots, b_p, b_d, omega, items=items, decode_points=settings.decode_points)
        result = solve_branch(tb, _options(settings, deadline, tb), objective="omega")
        milps += 1
        if result.assignment is not None and result.objective < best[0]:
            best = (float(result.objective), index, tb, result.assignment)
    value, _, tb, a = best
    if not deadline.expired():
        refined = refine(cache, tb, a, omega, settings, deadline, objective="omega")
        tb, a, value, milps = refined.tables, refined.assignment, refined.objective, milps + refined.milps
    if deadline.expired():
        status = "timeout"
    return LeastOmega(tb, a, value, status, milps)


def _worse(status: str, milp_status: str) -> str:
    """The status of a set of MILPs: timeout > feasible > optimal (an infeasible MILP is an exact answer)."""
    rank = {"optimal": 0, "infeasible": 0, "feasible": 1, "limit": 1, "timeout": 2}
    names = {0: "optimal", 1: "feasible", 2: "timeout"}
    return names[max(rank.get(status, 0), rank.get(milp_status, 1))]
