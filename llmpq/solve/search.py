"""The outer search of `llmpq`: device orders × micro-batch pairs, pruned by a cheap bound, one MILP per branch.

1. Every branch (order, b_p, b_d) — orders from `orders.device_orders`, sizes from
   `bounds.micro_batch_sizes` (b_p = 1 and b_d < B/N included) — gets a lower bound from `bounds`:
   first each order's cheap bound, then, when the order comes up, its pairs' full bounds
   (`BranchQueue`); memory-infeasible branches drop out.
2. Branches are visited in ascending bound (ties: order, then sizes). A branch whose bound is not below
   the incumbent's surrogate × (1 + slack) is pruned, and so are all after it. Otherwise, the first time
   it comes up, the LP relaxation of its count model (`milp.count_lp_bound`, a few ms) raises its bound
   and it goes back into the queue (or is pruned); the second time its MILP runs with that value as a
   cutoff; every solution is kept as a candidate. The slack keeps near-optimal plans of other branches
   for the exact re-scoring, which may rank them first.
3. Work limits make the result deterministic (`limits.SearchSettings`): at most `max_milps` MILPs, of which
   at most `item_milps` per-item ones, each with a node limit; the main loop also ends after
   `fruitless_grouped` grouped MILPs found no plan within the budget and the cutoff (a budget as tight as a
   per-layer plan's Σω needs per-layer freedom: step 4). The deadline is a safety net (status `timeout`,
   and only then may the plan depend on the machine).
4. Per-item models with many items (ω that differs by layer, large L·N·|bits|) group consecutive layers
   (`granularity`); after the main loop the best `refine_branches` grouped branches are re-solved per layer
   around their grouped solutions, warm-started from them (`granularity.refine`). Each candidate records the
   granularity it was solved at (and the grouping it was refined from).

Status: `optimal` when every branch was solved or pruned (the gap is then within the MILP tolerance),
`feasible` when a work limit stopped the search, `timeout` when the deadline did. The gap is
(incumbent − best bound)/incumbent, the best bound being the least of the unexplored branches' bounds
and the explored branches' MILP bounds. A grouped branch contributes its per-layer bound (cheap bound and LP
screen), not its MILP's bound, so the gap stays a per-layer gap, and the status is `optimal` only when that
gap is within tolerance.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field, replace

from llmpq.costmodel.context import CostContext
from llmpq.costmodel.pipeline import surrogate_cycle_weights, surrogate_points

from .bounds import StemArrays, order_bounds
from .candidate import Candidate
from .granularity import branch_items, layer_uniform, layers_per_item, refine
from .heuristic import heuristic_assignment
from .limits import Deadline, SearchSettings
from .milp import MilpOptions, count_lp_bound, interchangeable, solve_branch
from .orders import device_orders
from .quality import OmegaTable
from .tables import CostCache, ProblemTables, Slot, build_tables, from_stages, surrogate_ms, to_stages


@dataclass(frozen=True)
class Branch:
    """A branch with its best known lower bound; `screened` once its LP relaxation is part of the bound."""

    bound: float
    order_index: int
    slots: tuple[Slot, ...]
    b_p: int
    b_d: int
    screened: bool = False

    def key(self) -> tuple:
        return (self.bound, self.order_index, self.b_p, self.b_d)


@dataclass
class SearchResult:
    """What the search found: candidates (MILP solutions), status, surrogate incumbent, best bound, counters."""

    candidates: list[Candidate]
    status: str
    incumbent: float
    bound: float
    memory_feasible: bool
    stats: dict = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        if not math.isfinite(self.incumbent) or self.incumbent <= 0:
            return None
        return max(0.0, (self.incumbent - min(self.bound, self.incumbent)) / self.incumbent)


class BranchQueue:
    """Branches in ascending bound, with each order's full bounds computed only when the order comes up.

    Every order first enters with its cheap bound (`bounds.order_bounds(full=False)`, the least over its
    micro-batch pairs); when it is popped, its pairs enter with their full bounds (never below the cheap
    one). Ties break by order index, then sizes, so the visiting order is deterministic.
    """

    def __init__(self, cache: CostCache, omega: OmegaTable, budget: float, settings: SearchSettings):
        ctx = cache.ctx
        w = ctx.workload
        self.layers = ctx.shape.num_layers
        self.points = surrogate_points(w.gen_len, settings.decode_points) if w.gen_len > 1 else ()
        weights = dict(surrogate_cycle_weights(w.gen_len, settings.decode_points)) if self.points else {}
        self.cycle_w = [weights.get(k, 0.0) for k in self.points]
        self.omega_min, self.budget = omega.values.min(axis=0), budget
        self.arrays = StemArrays(cache, omega.bits, self.points)
        self.orders = device_orders(ctx.cluster, self.layers)
        self.memory_feasible = False
        self.expanded = 0
        self.heap: list[tuple] = []
        self.cheap: dict[int, object] = {}
        for index, slots in enumerate(self.orders):
            pb = order_bounds(self.arrays, slots, self.layers, self.cycle_w, full=False)
            self.cheap[index] = pb
            self.memory_feasible = self.memory_feasible or bool((pb.max_layers > 0).any())
            low = float(pb.lower.min())
            if math.isfinite(low):
                heapq.heappush(self.heap, (low, index, 0, 0, 0))

    def __len__(self) -> int:
        return len(self.heap)

    def peek_bound(self) -> float:
        return self.heap[0][0] if self.heap else math.inf

    def pop(self, threshold: float = math.inf) -> Branch | None:
        """The next branch (expanding orders on the way), or None when none is left. Pairs whose cheap bound is
        not below `threshold` (they can never be needed) are dropped when their order is expanded."""
        while self.heap:
            bound, index, kind, b_p, b_d = heapq.heappop(self.heap)
            slots = self.orders[index]
            if kind:
                return Branch(bound, index, slots, b_p, b_d, screened=kind == 2)
            self.expanded += 1
            cheap = self.cheap.pop(index)
            full = order_bounds(self.arrays, slots, self.layers, self.cycle_w, self.omega_min, self.budget,
                                pairs=cheap.lower < threshold)
            for i, bp in enumerate(full.prefill_sizes):
                for k, bd in enumerate(full.decode_sizes):
                    value = max(float(full.lower[i, k]), float(cheap.lower[i, k]), bound)
                    if math.isfinite(value):
                        heapq.heappush(self.heap, (value, index, 1, bp, bd))
        return None

    def push(self, br: Branch) -> None:
        heapq.heappush(self.heap, (br.bound, br.order_index, 2 if br.screened else 1, br.b_p, br.b_d))


def enumerate_branches(cache: CostCache, omega: OmegaTable, budget: float,
                       settings: SearchSettings, limit: int | None = None) -> tuple[list[Branch], bool]:
    """The first `limit` branches in ascending full bound (all when None), and whether any order fits memory."""
    queue = BranchQueue(cache, omega, budget, settings)
    out: list[Branch] = []
    while limit is None or len(out) < limit:
        br = queue.pop()
        if br is None:
            break
        out.append(br)
    return out, queue.memory_feasible


def cheap_branches(cache: CostCache, omega: OmegaTable, settings: SearchSettings, limit: int) -> list[Branch]:
    """The `limit` branches with the least cheap bound (no full bounds computed): a fast ranking."""
    queue = BranchQueue(cache, omega, math.inf, settings)
    ranked = []
    for index, pb in sorted(queue.cheap.items()):
        for i, b_p in enumerate(pb.prefill_sizes):
            for k, b_d in enumerate(pb.decode_sizes):
                if math.isfinite(pb.lower[i, k]):
                    ranked.append(Branch(float(pb.lower[i, k]), index, queue.orders[index], b_p, b_d))
    return sorted(ranked, key=Branch.key)[:limit]


def branch_tables(cache: CostCache, slots: tuple[Slot, ...], b_p: int, b_d: int, omega: OmegaTable,
                  budget: float, settings: SearchSettings) -> ProblemTables:
    items = branch_items(omega.num_layers, omega, len(slots), settings.item_cells)
    return build_tables(cache, slots, b_p, b_d, omega, items=items, budget=budget, theta=settings.theta,
                        decode_points=settings.decode_points)


def search(ctx: CostContext, omega: OmegaTable, budget: float, settings: SearchSettings,
           seeds: list[Candidate] = (), deadline: Deadline | None = None, cache: CostCache | None = None) -> SearchResult:
    """Run the branch search (module docstring). `seeds` are plans already known (their surrogate values set
    the first incumbent); they are not returned among the candidates. With `settings.heuristic_seed`, the
    heuristic's plan of the first branch visited (per-layer items only) is a candidate too."""
    started = time.monotonic()
    deadline = deadline or Deadline.after(settings.time_limit_s)
    cache = cache or CostCache(ctx)
    queue = BranchQueue(cache, omega, budget, settings)
    incumbent = min((s.surrogate_ms for s in seeds), default=math.inf)
    candidates: list[Candidate] = []
    solved: dict[tuple, ProblemTables] = {}   # tables of the branches whose MILP gave a candidate
    bounds: list[float] = []
    screened: dict[tuple, ProblemTables] = {}
    status, milps, item_milps, lps, grouped_any, seeded = "optimal", 0, 0, 0, False, False
    fruitless = 0
    while True:
        if queue.peek_bound() >= incumbent * (1 + settings.candidate_slack):
            break
        if (milps >= settings.max_milps or item_milps >= settings.item_milps
                or fruitless >= settings.fruitless_grouped):
            status = "feasible"
            break
        screen = settings.screen and lps < settings.max_lp_screens
        if deadline.expired(margin=0.05):
            status = "timeout"
            break
        br = queue.pop(incumbent * (1 + settings.candidate_slack))
        if br is None:
            break
        cutoff = incumbent * (1 + settings.candidate_slack) if math.isfinite(incumbent) else None
        if cutoff is not None and br.bound >= cutoff:
            queue.push(br)
            break
        key = (br.order_index, br.b_p, br.b_d)
        tb = screened.pop(key, None) or branch_tables(cache, br.slots, br.b_p, br.b_d, omega, budget, settings)
        if settings.heuristic_seed and not seeded:
            seeded = True
            a = heuristic_assignment(tb)
            if a is not None:
                seed = Candidate(br.slots, br.b_p, br.b_d, to_stages(tb, a), "heuristic", surrogate_ms(tb, a))
                candidates.append(seed)
                incumbent = min(incumbent, seed.surrogate_ms)
                cutoff = incumbent * (1 + settings.candidate_slack)
        if not br.screened and screen:
            lp = count_lp_bound(tb)
            if lp is not None:
                lps += 1
                if cutoff is not None and lp >= cutoff or math.isinf(lp):
                    bounds.append(max(br.bound, lp))
                    continue
                screened[key] = tb
                queue.push(replace(br, bound=max(br.bound, lp), screened=True))
                continue
        counts = interchangeable(tb)
        options = MilpOptions(backend=settings.backend, time_limit_s=deadline.milp_seconds(),
                              node_limit=settings.node_limit if counts else settings.item_node_limit,
                              rel_gap=settings.rel_gap, cutoff=cutoff)
        result = solve_branch(tb, options)
        milps += 1
        item_milps += 0 if counts else 1
        grouped = layers_per_item(tb) > 1
        if grouped and result.assignment is None:
            fruitless += 1  # nothing within the budget and cutoff at this granularity: per-layer refinement's job
        if result.status == "timeout":
            status = "timeout"
        elif result.status in ("feasible", "limit") and status == "optimal":
            status = "feasible"
        if result.assignment is not None:
            candidates.append(Candidate(br.slots, br.b_p, br.b_d, to_stages(tb, result.assignment), "milp",
                                        float(result.objective), layers_per_item(tb)))
            solved[br.slots, br.b_p, br.b_d] = tb
            incumbent = min(incumbent, float(result.objective))
        grouped_any = grouped_any or grouped
        bounds.append(br.bound if grouped else max(br.bound, result.bound))
    refine_milps = 0
    if not layer_uniform(omega) and status != "timeout":
        refined, refine_milps, stopped = _refine_best(cache, queue, omega, candidates + list(seeds), solved, budget,
                                                      settings, deadline)
        candidates += refined
        incumbent = min([incumbent] + [c.surrogate_ms for c in refined])
        status = "timeout" if stopped else status
    best_bound = min(bounds + [queue.peek_bound(), incumbent])
    loose = incumbent > 0 and (incumbent - best_bound) > settings.rel_gap * incumbent
    if grouped_any and status == "optimal" and loose:
        status = "feasible"  # optimal for grouped layers only; the bound is the per-layer one
    best = min(candidates, key=lambda c: (c.surrogate_ms, c.key()), default=None)
    stats = {"orders": len(queue.orders), "orders_expanded": queue.expanded, "milps": milps, "item_milps": item_milps,
             "refine_milps": refine_milps, "lp_screens": lps, "open_branches": len(queue),
             "search_s": time.monotonic() - started, "count_model": layer_uniform(omega),
             "layers_per_item": best.layers_per_item if best is not None else None,
             "refined_from": best.refined_from if best is not None else None}
    return SearchResult(candidates, status, incumbent, best_bound, queue.memory_feasible, stats)


def _refine_best(cache: CostCache, queue: BranchQueue, omega: OmegaTable, pool: list[Candidate],
                 solved: dict[tuple, ProblemTables], budget: float, settings: SearchSettings,
                 deadline: Deadline) -> tuple[list[Candidate], int, bool]:
    """Per-layer refinements (`granularity.refine`) of the pool's plans (grouped MILP solutions, heuristic and
    seed plans): the best plan moved to the `refine_transplants` other micro-batch pairs of its order with the least
    bound, then the best plans of the best `refine_branches` branches on their own branch; at most `refine_milps`
    MILPs. Returns the improved plans, the MILPs run, and whether the deadline stopped it."""
    ranked = sorted(pool, key=lambda c: (c.surrogate_ms, c.key()))
    own, seen = [], set()
    for c in ranked:
        key = (c.slots, c.b_p, c.b_d)
        if key not in seen and len(own) < settings.refine_branches and (c.layers_per_item > 1 or c.source != "milp"):
            own.append((c, c.b_p, c.b_d))
        seen.add(key)
    moved = []
    if ranked:
        best = ranked[0]
        pb = order_bounds(queue.arrays, best.slots, queue.layers, queue.cycle_w, queue.omega_min, budget)
        pairs = sorted((float(pb.lower[i, k]), b_p, b_d) for i, b_p in enumerate(pb.prefill_sizes)
                       for k, b_d in enumerate(pb.decode_sizes) if math.isfinite(pb.lower[i, k]))
        moved = [(best, b_p, b_d) for _, b_p, b_d in pairs if (best.slots, b_p, b_d) not in seen]
    tasks = moved[:settings.refine_transplants] + own
    out, milps = [], 0
    for c, b_p, b_d in tasks:
        if milps >= settings.refine_milps:
            break
        if deadline.expired(margin=0.05):
            return out, milps, True
        tb = solved.get((c.slots, b_p, b_d)) if c.source == "milp" and (b_p, b_d) == (c.b_p, c.b_d) else None
        if tb is None:
            tb = build_tables(cache, c.slots, b_p, b_d, omega, budget=budget, theta=settings.theta,
                              decode_points=settings.decode_points)
        limits = replace(settings, refine_rounds=min(settings.refine_rounds, settings.refine_milps - milps))
        got = refine(cache, tb, from_stages(tb, c.stages), omega, limits, deadline)
        milps += got.milps
        if got.improved:
            origin = f"grouped:{c.layers_per_item}" if c.source == "milp" else c.source
            if (b_p, b_d) != (c.b_p, c.b_d):
                origin += f" moved to b_p={b_p} b_d={b_d}"
            out.append(Candidate(c.slots, b_p, b_d, to_stages(got.tables, got.assignment), "milp", got.objective,
                                 1, origin))
    return out, milps, deadline.expired()


def heuristic_candidates(cache: CostCache, omega: OmegaTable, budget: float, settings: SearchSettings, top: int = 6,
                         deadline: Deadline | None = None) -> list[Candidate]:
    """Heuristic plans of the `top` branches with the least cheap bound (per-layer items), as candidates."""
    out = []
    for br in cheap_branches(cache, omega, settings, 3 * top):
        if len(out) >= top or (deadline is not None and deadline.expired()):
            break
        tb = build_tables(cache, br.slots, br.b_p, br.b_d, omega, budget=budget, theta=settings.theta,
                          decode_points=settings.decode_points)
        a = heuristic_assignment(tb)
        if a is not None:
            out.append(Candidate(br.slots, br.b_p, br.b_d, to_stages(tb, a), "heuristic", surrogate_ms(tb, a)))
    return out
