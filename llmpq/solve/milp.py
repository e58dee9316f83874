"""The MILP of one branch (fixed device order and micro-batches), built with pulp, solved by HiGHS or CBC.

Variables (items g, stages j, bit columns c; see `tables`):

- z[g,j,c] ∈ {0,1}: item g runs on stage j at bits[c] (only where the device has a kernel for bits[c]);
- β^p ≥ t^p_j, β^p ≥ c^p_j; β^d_k ≥ t^d_j(k), β^d_k ≥ c^d_j per sampled round k (epigraphs of the maxes);
- y_k ≥ K_d·β^d_k, y_k ≥ R^d(k): the cycle of round k (exact at the optimum since it is minimised).

Rows: Σ_{j,c} z[g,j,c] = 1 (each item once); contiguity in cumulative form
U[g,j] ≥ U[g+1,j] with U[g,j] = Σ_{j' ≤ j, c} z[g,j',c] ((G−1)(N−1) rows); every stage holds an item;
item 0 on stage 0 and the last item on stage N−1; memory fixed_j + w_j + Σ mem·z ≤ capacity_j, where the
kernels' workspace w_j ≥ v·u[j,v] for each distinct workspace v of the stage's columns, u[j,v] ∈ {0,1} being 1
when stage j uses a column with that workspace (Σ z ≤ M·u[j,v], M the items that fit beside it); the budget
Σ ω·z ≤ Ω. Symmetry: consecutive items with identical rows (same time, memory, ω) that share a stage
take non-decreasing bit columns (any plan can be reordered so, at the same cost):
Σ_{c ≤ t} z[g+1,j,c] + Σ_{c > t} z[g,j,c] ≤ 1 for every stage j and threshold t.

Objective: the surrogate F of `tables` (R as sums, β and y as above), plus θ·Σω.

When every item has identical rows (homogeneous decoder layers with a layer-uniform ω, e.g. the shape-only
proxy) the per-item binaries are aggregated exactly into integers n[j,c] = Σ_g z[g,j,c]
(`build_count_model`): the same optimum with N·C variables instead of G·N·C, and none of the
symmetric permutations that make the per-item model slow to prove.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import pulp

from .tables import Assignment, ProblemTables, omega_of, surrogate_ms, violations

BACKENDS = ("highs", "cbc")
# Determinism: HiGHS runs on one thread with a fixed seed, so the same model gives the same search on any
# machine; only its time limit (the solve's deadline, a safety net) depends on the machine's speed.
HIGHS_OPTIONS = {"threads": 1, "random_seed": 0}
SUB_MIP_OPTIONS = ("mip_heuristic_run_rins", "mip_heuristic_run_rens", "mip_heuristic_run_feasibility_jump")


@dataclass(frozen=True)
class MilpOptions:
    """Solver settings: a wall-clock limit (safety net), a deterministic node limit, the gap, a cutoff."""

    backend: str = "highs"
    time_limit_s: float = 10.0
    node_limit: int | None = None
    rel_gap: float = 1e-4
    cutoff: float | None = None   # only solutions below this objective are of interest
    warm: Assignment | None = None  # a known solution of the branch (per item), handed to HiGHS as a start
    sub_mips: bool = True         # HiGHS's sub-MIP and feasibility-jump heuristics (needless with a good start)
    symmetry: bool = True
    aggregate: bool = True        # use the count model when all items are interchangeable


@dataclass(frozen=True)
class MilpResult:
    """status: optimal (proven), feasible (a limit stopped it with a solution), infeasible (none exists,
    or none below the cutoff), timeout (the time limit stopped it), limit (the node limit stopped it with
    no solution). `bound` is a valid lower bound on the branch's optimum (inf when infeasible)."""

    status: str
    assignment: Assignment | None
    objective: float | None
    bound: float
    nodes: int = 0


def interchangeable(tb: ProblemTables) -> bool:
    """Whether all items are identical (time, memory and ω rows) and unrestricted: then only per-stage counts
    matter."""
    return tb.mask is None and all(_identical(tb, g) for g in range(tb.n_items - 1))


def _identical(tb: ProblemTables, g: int) -> bool:
    h = g + 1
    return (np.array_equal(tb.t_prefill[g], tb.t_prefill[h]) and np.array_equal(tb.t_decode[g], tb.t_decode[h])
            and np.array_equal(tb.mem_bytes[g], tb.mem_bytes[h]) and np.array_equal(tb.omega[g], tb.omega[h]))


def _expr(terms) -> pulp.LpAffineExpression:
    coef: dict = {}
    for v, a in terms:
        coef[v] = coef.get(v, 0.0) + float(a)
    return pulp.LpAffineExpression([(v, a) for v, a in coef.items() if a != 0.0])


Cell = tuple  # (variable, item row g, stage j, column c): the variable counts items of row g on (j, c)


def _common(prob: pulp.LpProblem, tb: ProblemTables, cells: list[Cell], objective: str = "time") -> None:
    """Rows and objective shared by both forms: memory, budget, then either the surrogate with the epigraphs
    of β and cycles (objective "time") or Σω alone (objective "omega")."""
    N = tb.n_stages
    jw = len(str(N))
    by_stage: list[list[Cell]] = [[] for _ in range(N)]
    for cell in cells:
        by_stage[cell[2]].append(cell)

    def stage_time(j: int, table: np.ndarray) -> list:
        return [(v, table[g, j, c]) for v, g, _, c in by_stage[j]]

    for j in range(N):
        room = float(tb.capacity[j] - tb.fixed_mem[j])
        scale = max(room, max((float(tb.mem_bytes[g, j, c]) for _, g, _, c in by_stage[j]), default=1.0), 1e-300)
        terms = [(v, tb.mem_bytes[g, j, c] / scale) for v, g, _, c in by_stage[j]]
        sizes = sorted({float(tb.workspace[j, c]) for _, _, _, c in by_stage[j] if tb.workspace[j, c] > 0})
        if sizes:
            work = prob.add_variable(f"w_{j:0{jw}d}", lowBound=0.0)
            for k, size in enumerate(sizes):  # one binary per distinct workspace (kernels often share one)
                cols = {c for _, _, _, c in by_stage[j] if tb.workspace[j, c] == size}
                used = prob.add_variable(f"u_{j:0{jw}d}_{k}", 0, 1, pulp.LpBinary)
                # big-M: the items of those columns that fit beside the workspace (a tighter relaxation than G)
                smallest = min(float(tb.mem_bytes[g, j, c]) for _, g, _, c in by_stage[j] if c in cols)
                most = min(float(tb.n_items), max(0.0, math.floor((room - size) / smallest + 1e-9)))
                prob += _expr([(v, 1.0) for v, _, _, c in by_stage[j] if c in cols]
                              + [(used, -most)]) <= 0, f"uses_{j:0{jw}d}_{k}"
                prob += _expr([(work, 1.0), (used, -size / scale)]) >= 0, f"ws_{j:0{jw}d}_{k}"
            terms.append((work, 1.0))
        prob += _expr(terms) <= room / scale, f"mem_{j:0{jw}d}"
    omega_terms = [(v, tb.omega[g, c]) for v, g, _, c in cells]
    if math.isfinite(tb.budget):
        prob += _expr(omega_terms) <= tb.budget, "budget"
    if objective == "omega":
        prob += _expr(omega_terms)
        return
    if objective != "time":
        raise ValueError(f"unknown MILP objective {objective!r} (time or omega)")

    beta_p = prob.add_variable("beta_p", lowBound=float(tb.comm_prefill.max()))
    for j in range(N):
        prob += _expr(stage_time(j, tb.t_prefill) + [(beta_p, -1.0)]) <= -float(tb.fixed_prefill[j]), f"bp_{j:0{jw}d}"
    r_p = _expr(t for j in range(N) for t in stage_time(j, tb.t_prefill))
    total = r_p + (tb.k_p - 1) * beta_p + float(tb.fixed_prefill.sum() + tb.comm_prefill.sum())

    if tb.points:
        last = len(tb.points) - 1
        const_d = float(tb.fixed_decode.sum() + tb.comm_decode.sum())
        for p in range(len(tb.points)):
            weight = float(tb.cycle_weights[p])
            if weight == 0.0 and p != last:
                continue
            td = tb.t_decode[..., p]
            beta = prob.add_variable(f"bd_{p}", lowBound=float(tb.comm_decode.max()))
            for j in range(N):
                prob += _expr(stage_time(j, td) + [(beta, -1.0)]) <= -float(tb.fixed_decode[j]), f"bd_{p}_{j:0{jw}d}"
            r_d = _expr(t for j in range(N) for t in stage_time(j, td))
            if weight > 0.0:
                cyc = prob.add_variable(f"cyc_{p}", lowBound=0.0)
                prob += cyc - tb.k_d * beta >= 0, f"cyc_beta_{p}"
                prob += cyc - r_d >= const_d, f"cyc_ring_{p}"
                total += weight * cyc
            if p == last:
                total += r_d + const_d + (tb.k_d - 1) * beta
    if tb.theta:
        total += tb.theta * _expr(omega_terms)
    prob += total


def build_model(tb: ProblemTables, symmetry: bool = True, objective: str = "time") -> tuple[pulp.LpProblem, dict]:
    """The per-item model: binaries z[g,j,c] keyed (g, j, c)."""
    G, N, C = tb.n_items, tb.n_stages, tb.n_bits
    prob = pulp.LpProblem("llmpq_branch", pulp.LpMinimize)
    gw, jw = len(str(G)), len(str(N))
    z = {(g, j, c): prob.add_variable(f"z_{g:0{gw}d}_{j:0{jw}d}_{c}", 0, 1, pulp.LpBinary)
         for g in range(G) for j in range(N) for c in range(C)
         if tb.allowed[j, c] and (tb.mask is None or tb.mask[g, j, c])}

    def on_stage(g: int, j: int) -> list:
        return [(z[g, j, c], 1.0) for c in range(C) if (g, j, c) in z]

    for g in range(G):
        prob += _expr(t for j in range(N) for t in on_stage(g, j)) == 1, f"one_{g:0{gw}d}"
    for g in range(G - 1):
        for j in range(N - 1):
            terms = [t for jj in range(j + 1) for t in on_stage(g, jj)]
            terms += [(v, -a) for jj in range(j + 1) for v, a in on_stage(g + 1, jj)]
            prob += _expr(terms) >= 0, f"contig_{g:0{gw}d}_{j:0{jw}d}"
    for j in range(N):
        prob += _expr(t for g in range(G) for t in on_stage(g, j)) >= 1, f"used_{j:0{jw}d}"
    prob += _expr(on_stage(0, 0)) == 1, "first"
    prob += _expr(on_stage(G - 1, N - 1)) == 1, "last"
    if symmetry:
        for g in range(G - 1):
            if not _identical(tb, g) or tb.mask is not None:
                continue
            for j in range(N):
                cols = [c for c in range(C) if (g, j, c) in z]
                for t in range(len(cols) - 1):
                    terms = [(z[g + 1, j, c], 1.0) for c in cols[: t + 1]] + [(z[g, j, c], 1.0) for c in cols[t + 1:]]
                    prob += _expr(terms) <= 1, f"sym_{g:0{gw}d}_{j:0{jw}d}_{t}"
    _common(prob, tb, [(v, g, j, c) for (g, j, c), v in z.items()], objective)
    return prob, z


def build_count_model(tb: ProblemTables, objective: str = "time") -> tuple[pulp.LpProblem, dict]:
    """The aggregated model for interchangeable items: integers n[j,c] = Σ_g z[g,j,c] keyed (j, c).

    Exact when every item has the same rows: a plan's cost depends only on how many items each stage
    holds at each bit-width, stage j takes the next Σ_c n[j,c] items (contiguity holds by construction)
    and its items take their columns in ascending order (the per-item model's symmetry rows).
    """
    G, N, C = tb.n_items, tb.n_stages, tb.n_bits
    prob = pulp.LpProblem("llmpq_branch_counts", pulp.LpMinimize)
    jw = len(str(N))
    n = {(j, c): prob.add_variable(f"n_{j:0{jw}d}_{c}", 0, G, pulp.LpInteger)
         for j in range(N) for c in range(C) if tb.allowed[j, c]}
    prob += _expr((v, 1.0) for v in n.values()) == G, "all_items"
    for j in range(N):
        prob += _expr((n[j, c], 1.0) for c in range(C) if (j, c) in n) >= 1, f"used_{j:0{jw}d}"
    _common(prob, tb, [(v, 0, j, c) for (j, c), v in n.items()], objective)
    return prob, n


class _Highs(pulp.HiGHS):
    """pulp's HiGHS (highspy), reading the statuses pulp does not map (node limit, cutoff) and the bound.

    pulp passes `threads` and extra keyword options through `createAndConfigureSolver`, which this class
    replaces: every option is set here (one thread, a fixed seed: `HIGHS_OPTIONS`). `start` (variable -> value,
    possibly partial) is handed to HiGHS as a starting solution, which it completes and uses as an incumbent.
    """

    def __init__(self, *args, start: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = start or {}

    def createAndConfigureSolver(self, lp):
        lp.solverModel = _quiet_highs()
        lp.solverModel.setOptionValue("mip_rel_gap", self.gapRel)
        lp.solverModel.setOptionValue("time_limit", float(self.timeLimit))
        for key, value in self.optionsDict.items():
            lp.solverModel.setOptionValue(key, value)

    def callSolver(self, lp):
        if self.start:
            index = np.asarray([v.index for v in self.start], dtype=np.int32)
            values = np.asarray(list(self.start.values()), dtype=float)
            lp.solverModel.setSolution(len(index), index, values)
        lp.solverModel.run()

    def findSolutionValues(self, lp):
        import highspy

        h = lp.solverModel
        status = h.getModelStatus()
        info = h.getInfo()
        has_solution = info.primal_solution_status == 2
        if has_solution:
            values = list(h.getSolution().col_value)
            for var in lp.variables():
                var.varValue = values[var.index]
        MS = highspy.HighsModelStatus
        lp.llmpq_status = {MS.kOptimal: "optimal", MS.kInfeasible: "infeasible", MS.kTimeLimit: "timeout",
                           MS.kObjectiveBound: "infeasible", MS.kSolutionLimit: "limit",
                           MS.kIterationLimit: "limit"}.get(status, "error")
        lp.llmpq_has_solution = has_solution
        lp.llmpq_bound = float(info.mip_dual_bound) + float(lp.objective.constant or 0.0)  # HiGHS drops it
        lp.llmpq_nodes = int(info.mip_node_count)
        if status == MS.kOptimal:
            return pulp.LpStatusOptimal, pulp.LpSolutionOptimal
        if status in (MS.kInfeasible, MS.kObjectiveBound):
            return pulp.LpStatusInfeasible, pulp.LpSolutionInfeasible
        if has_solution:
            return pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible
        return pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound


def _quiet_highs() -> object:
    """A highspy.Highs whose construction banner does not reach stdout (the log of a solve stays clean)."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    h.setOptionValue("output_flag", False)
    for key, value in HIGHS_OPTIONS.items():
        h.setOptionValue(key, value)
    return h


def _solver(options: MilpOptions, offset: float = 0.0, start: dict | None = None) -> pulp.LpSolver:
    """The backend: HiGHS through highspy, else CBC (an installed `cbc`, else pulp's bundled one).

    `offset` is the objective's constant, which HiGHS does not see (the cutoff is shifted by it); `start`
    a starting solution (variable -> value; HiGHS only).
    """
    limit = max(0.01, float(options.time_limit_s))
    if options.backend == "highs" and pulp.HiGHS().available():
        params = {"mip_feasibility_tolerance": 1e-7}
        if options.node_limit is not None:
            params["mip_max_nodes"] = int(options.node_limit)
        if options.cutoff is not None and math.isfinite(options.cutoff):
            params["objective_bound"] = float(options.cutoff) - offset
        if not options.sub_mips:
            params.update({name: False for name in SUB_MIP_OPTIONS})
        return _Highs(msg=False, timeLimit=limit, gapRel=options.rel_gap, start=start, **params)
    if options.backend not in BACKENDS:
        raise ValueError(f"unknown MILP backend {options.backend!r} (known: {', '.join(BACKENDS)})")
    extra = [f"maxNodes {int(options.node_limit)}"] if options.node_limit is not None else []
    args = dict(msg=False, timeLimit=limit, gapRel=options.rel_gap, threads=1, options=extra)
    installed = pulp.COIN_CMD(**args)
    if installed.available():
        return installed
    with warnings.catch_warnings():  # pulp's bundled CBC: deprecated for PuLP 4, the only CBC many hosts have
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(**args)


def _start(tb: ProblemTables, z: dict, warm: Assignment, counts: bool) -> dict:
    """The integer variables' values of a known assignment (the continuous ones are left to the solver)."""
    if len(warm.stage) != tb.n_items:
        raise ValueError(f"warm start has {len(warm.stage)} items, the branch {tb.n_items}")
    if counts:
        placed: dict = {}
        for j, c in zip(warm.stage, warm.column):
            placed[j, c] = placed.get((j, c), 0) + 1
        return {v: float(placed.get(key, 0)) for key, v in z.items()}
    chosen = set(enumerate(zip(warm.stage, warm.column)))
    return {v: 1.0 if (g, (j, c)) in chosen else 0.0 for (g, j, c), v in z.items()}


def _read(tb: ProblemTables, z: dict) -> Assignment:
    stage, column = [0] * tb.n_items, [0] * tb.n_items
    for (g, j, c), v in z.items():
        if (v.varValue or 0.0) > 0.5:
            stage[g], column[g] = j, c
    return Assignment(tuple(stage), tuple(column))


def _read_counts(tb: ProblemTables, n: dict) -> Assignment:
    stage, column = [], []
    for (j, c), v in sorted(n.items()):
        count = int(round(v.varValue or 0.0))
        stage += [j] * count
        column += [c] * count
    if len(stage) != tb.n_items:
        raise RuntimeError(f"count model placed {len(stage)} of {tb.n_items} items")
    return Assignment(tuple(stage), tuple(column))


def solve_branch(tb: ProblemTables, options: MilpOptions = MilpOptions(), objective: str = "time") -> MilpResult:
    """Solve the MILP of one branch, minimising the surrogate (objective "time") or Σω ("omega").

    The returned objective is recomputed from the solution (F of `tables`, or Σω).
    """
    if tb.n_stages > tb.n_items:
        return MilpResult("infeasible", None, None, math.inf)
    counts = options.aggregate and interchangeable(tb)
    prob, z = build_count_model(tb, objective) if counts else build_model(tb, options.symmetry, objective)
    start = _start(tb, z, options.warm, counts) if options.warm is not None else None
    solver = _solver(options, float(prob.objective.constant or 0.0), start)
    prob.solve(solver)
    if isinstance(solver, _Highs):
        status, has_solution = prob.llmpq_status, prob.llmpq_has_solution
        bound, nodes = prob.llmpq_bound, prob.llmpq_nodes
    else:
        sol = pulp.LpSolution[prob.sol_status]
        has_solution = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        status = {"Optimal Solution Found": "optimal", "Infeasible": "infeasible"}.get(sol, "timeout")
        bound, nodes = -math.inf, 0
    if status == "error":
        raise RuntimeError(f"MILP solver failed on branch {tb.slots} b_p={tb.b_p} b_d={tb.b_d}")
    if status == "infeasible" or not has_solution:
        if status == "infeasible":
            bound = math.inf if options.cutoff is None else float(options.cutoff)
        elif not math.isfinite(bound):
            bound = -math.inf
        return MilpResult(status, None, None, bound, nodes)
    a = _read_counts(tb, z) if counts else _read(tb, z)
    bad = violations(tb, a, omega_tol=1e-6)
    if bad:
        raise RuntimeError(f"MILP solution violates its own model: {'; '.join(bad)}")
    value = surrogate_ms(tb, a) if objective == "time" else omega_of(tb, a)
    if status == "optimal":
        bound = value if not math.isfinite(bound) else min(bound, value)
        if options.backend == "cbc":
            bound = value * (1 - options.rel_gap)
    elif status == "limit":
        status = "feasible"
    return MilpResult(status, a, value, bound if math.isfinite(bound) else -math.inf, nodes)


def _per_layer(tb: ProblemTables) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(t_prefill [N,C], t_decode [N,C,P], bytes [N,C], least ω per layer [C]) when every layer costs the same
    time and memory (homogeneous decoder layers, whatever the items' sizes); else None."""
    sizes = tb.sizes.astype(float)
    out = []
    for arr in (tb.t_prefill, tb.t_decode, tb.mem_bytes):
        per = arr / sizes.reshape((-1,) + (1,) * (arr.ndim - 1))
        if not np.allclose(per, per[0], rtol=1e-12, atol=0.0):
            return None
        out.append(per[0])
    return out[0], out[1], out[2], (tb.omega / sizes[:, None]).min(axis=0)


def count_lp_bound(tb: ProblemTables) -> float | None:
    """A valid lower bound on the branch's optimum from the LP relaxation of the count model over layers
    (inf if even the LP is infeasible), built directly for highspy: cheap enough to screen a branch
    before its MILP. Where ω differs by layer, each bit-width's least per-layer ω stands in for it (a
    relaxation of the budget, so still a bound).

    None when layers differ in time or memory, or highspy is missing.
    """
    try:
        import highspy
    except ImportError:
        return None
    per_layer = _per_layer(tb)
    if per_layer is None:
        return None
    tp, td_all, mem1, om = per_layer
    N, C, G = tb.n_stages, tb.n_bits, int(tb.sizes.sum())
    cells = [(j, c) for j in range(N) for c in range(C) if tb.allowed[j, c]]
    P = len(tb.points)
    used = [p for p in range(P) if tb.cycle_weights[p] > 0 or p == P - 1]
    weighted = [p for p in range(P) if tb.cycle_weights[p] > 0]
    nv = len(cells) + 1 + len(used) + len(weighted)
    b_p, b_d = len(cells), {p: len(cells) + 1 + i for i, p in enumerate(used)}
    cy = {p: len(cells) + 1 + len(used) + i for i, p in enumerate(weighted)}
    cost = np.zeros(nv)
    const = float(tb.fixed_prefill.sum() + tb.comm_prefill.sum())
    for k, (j, c) in enumerate(cells):
        cost[k] = tp[j, c] + tb.theta * om[c]
    cost[b_p] = tb.k_p - 1
    rows, lo, hi = [], [], []

    def row(coef: dict, low: float, high: float) -> None:
        rows.append(coef)
        lo.append(low)
        hi.append(high)

    inf = highspy.kHighsInf
    row({k: 1.0 for k in range(len(cells))}, G, G)
    for j in range(N):
        row({k: 1.0 for k, (jj, _) in enumerate(cells) if jj == j}, 1.0, inf)
        room = float(tb.capacity[j] - tb.fixed_mem[j])
        scale = max(abs(room), max(float(mem1[j, c]) for jj, c in cells if jj == j), 1e-300)
        row({k: mem1[jj, c] / scale for k, (jj, c) in enumerate(cells) if jj == j}, -inf, room / scale)
        row({**{k: tp[jj, c] for k, (jj, c) in enumerate(cells) if jj == j}, b_p: -1.0},
            -inf, -float(tb.fixed_prefill[j]))
    if math.isfinite(tb.budget):
        row({k: om[c] for k, (_, c) in enumerate(cells)}, -inf, tb.budget)
    if P:
        const_d = float(tb.fixed_decode.sum() + tb.comm_decode.sum())
        for p in used:
            td = td_all[:, :, p]
            for j in range(N):
                row({**{k: td[jj, c] for k, (jj, c) in enumerate(cells) if jj == j}, b_d[p]: -1.0},
                    -inf, -float(tb.fixed_decode[j]))
            if p in cy:
                cost[cy[p]] = tb.cycle_weights[p]
                row({cy[p]: 1.0, b_d[p]: -float(tb.k_d)}, 0.0, inf)
                row({cy[p]: 1.0, **{k: -td[j, c] for k, (j, c) in enumerate(cells)}}, const_d, inf)
            if p == P - 1:
                for k, (j, c) in enumerate(cells):
                    cost[k] += td[j, c]
                cost[b_d[p]] += tb.k_d - 1
                const += const_d
    lower = np.zeros(nv)
    upper = np.full(nv, inf)
    upper[: len(cells)] = G
    lower[b_p] = float(tb.comm_prefill.max())
    for p in used:
        lower[b_d[p]] = float(tb.comm_decode.max())
    by_col: list[list[tuple[int, float]]] = [[] for _ in range(nv)]
    for r, coef in enumerate(rows):
        for k, a in coef.items():
            if a != 0.0:
                by_col[k].append((r, float(a)))
    start = np.cumsum([0] + [len(col) for col in by_col])
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = nv, len(rows)
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = cost, lower, upper
    lp.row_lower_, lp.row_upper_ = np.asarray(lo, float), np.asarray(hi, float)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = start.astype(np.int32)
    lp.a_matrix_.index_ = np.asarray([r for col in by_col for r, _ in col], dtype=np.int32)
    lp.a_matrix_.value_ = np.asarray([a for col in by_col for _, a in col], dtype=float)
    h = _quiet_highs()
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return math.inf
    if status != highspy.HighsModelStatus.kOptimal:
        return None
    return float(h.getInfo().objective_function_value) + const
