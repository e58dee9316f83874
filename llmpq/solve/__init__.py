"""llmpq.solve: plan device order, per-layer bits and micro-batches; baselines; plan I/O; explain.

Modules (one job each; nothing is imported here, so reading a plan never imports pulp):

- `plan`: the `Plan` dataclass, canonical JSON, `read_plan` with validation (deploy and evaluate read this);
- `planner.solve(exp, results)`: one experiment with its configured method -> `SolveOutcome(plan, estimate, meta)`;
- `run`: the `llmpq solve` verb (plan JSON, `plan_layers` parquet, `.meta.json` sidecar); `explain`: `llmpq explain`;
- `tables`: numeric problem of one branch (fixed order, b_p, b_d) from the cost model, and its surrogate;
- `milp`: the pulp model of one branch (per-item binaries, or exact counts for interchangeable items);
- `bounds`: vectorised lower bounds per order over all micro-batch pairs; `orders`: device orders;
- `search`: the branch-and-bound over orders and micro-batch pairs; `heuristic`: fast plans without a MILP;
- `limits`: the solve's deadline and deterministic work limits; `granularity`: layer grouping and per-layer
  refinement; `omega_min`: the least Σω that fits memory;
- `baselines`: pipeedge, uniform, adabits, uniform-best; `methods`: method names; `partition`: exact min-max
  partition of identical layers;
- `quality`: ω tables (indicator or shape-only proxy) and the budget Ω; `feasibility`, `errors`: infeasibility;
  `skip`: steps after solve skip a method recorded as infeasible.
"""
