"""The limits of one solve: deterministic work limits, and one wall-clock deadline as a safety net.

Work limits (counts of MILPs, branch-and-bound nodes, refinement steps, orders) decide where every part of a
solve stops, so the same inputs give the same plan on any machine. The deadline (`solver.time_limit_s`,
counted from the start of the solve, or of the `llmpq solve` process) is shared by everything the solve
runs: baselines, `budget_from`, the search, the heuristic and the wording of errors. Each MILP's time limit
is what is left of it. A part stopped by the deadline returns its best plan so far with status `timeout`:
the only case in which the plan may depend on the machine's speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

MIN_MILP_S = 0.01  # HiGHS needs a positive time limit


@dataclass(frozen=True)
class Deadline:
    """The monotonic-clock time at which the solve must stop."""

    at: float

    @staticmethod
    def after(seconds: float, start: float | None = None) -> "Deadline":
        """`seconds` after `start` (a `time.monotonic()` value; now when None)."""
        return Deadline((time.monotonic() if start is None else start) + float(seconds))

    def remaining(self) -> float:
        """Seconds left (≥ 0)."""
        return max(0.0, self.at - time.monotonic())

    def expired(self, margin: float = 0.0) -> bool:
        """Whether less than `margin` seconds are left."""
        return self.remaining() <= margin

    def milp_seconds(self) -> float:
        """The time limit of one MILP started now: what is left of the deadline."""
        return max(MIN_MILP_S, self.remaining())


@dataclass(frozen=True)
class SearchSettings:
    """Work limits and tolerances of the search, the baselines' MILPs and the refinement of grouped layers.

    Deterministic limits: `max_milps` MILPs in the main search, at most `item_milps` of them per-item models
    (far more work each), and at most `max_lp_screens` LP screens, ending after `fruitless_grouped` grouped
    MILPs found no plan within the budget and the incumbent; each MILP of at most `node_limit` nodes (count models) or `item_node_limit` nodes
    (per-item models); branches whose per-item model would
    exceed `item_cells` binaries group consecutive layers; afterwards the best `refine_branches` grouped
    branches are re-solved per layer around their grouped solutions (`granularity.refine`: at most
    `refine_rounds` warm-started MILPs of `refine_node_limit` nodes each, stage boundaries free within
    `refine_window` layers), and the best plan is moved to `refine_transplants` other micro-batch pairs of its
    order, at most `refine_milps` refinement MILPs in all. `time_limit_s`
    is the deadline (a safety net).
    """

    backend: str = "highs"
    time_limit_s: float = 10.0
    decode_points: int = 3
    theta: float = 0.0
    rel_gap: float = 1e-4
    candidate_slack: float = 0.003
    max_milps: int = 120
    item_milps: int = 8
    fruitless_grouped: int = 3
    max_lp_screens: int = 100
    node_limit: int = 2000
    item_node_limit: int = 200
    item_cells: int = 300
    refine_branches: int = 2
    refine_transplants: int = 2
    refine_milps: int = 5
    refine_rounds: int = 2
    refine_window: int = 2
    refine_node_limit: int = 100
    screen: bool = True          # LP relaxation of the count model before each branch's MILP
    heuristic_seed: bool = True  # the heuristic's plan of the first branch visited as a first incumbent
