"""`llmpq solve`: plan one model × cluster × workload with the configured solver and write the artifacts.

Writes `<out>` (default `results/plans/{model}/{cluster}/{workload}/{solver}.json`, canonical JSON),
`<out stem>.parquet` (the `plan_layers` table) and `<out stem>.meta.json` (solve time, host, counters).
A method that cannot fit memory or the quality budget is an error (exit 1, nothing written), or, with
`infeasible=record` (the workflow's solve rule), its infeasibility written as its plan (`plan.InfeasiblePlan`,
an empty `plan_layers` table) and exit 0, so that the other methods of an experiment go on.
A workload with a prompts file is planned for the file's shape (`llmpq.generate.planning`) and the plan
records the file's sha256 and statistics.
"""

from __future__ import annotations

import json
import platform
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmpq import __version__, paths
from llmpq.artifacts import provenance, write_table, write_text
from llmpq.config import Experiment
from llmpq.generate.planning import planning_experiment

from .errors import Infeasible
from .plan import InfeasiblePlan, Plan, PlanPrompts, layer_rows, layers_path, meta_path, to_json
from .planner import SolveOutcome, solve


def write_plan(plan: Plan | InfeasiblePlan, out: Path, meta: dict[str, Any], config_hash: str = "") -> Path:
    """Write the plan JSON (or the infeasibility record), its plan_layers table and its sidecar; returns the path."""
    out = Path(out)
    feasible = isinstance(plan, Plan)
    write_text(to_json(plan) if feasible else plan.to_json(), out)
    write_table("plan_layers", layer_rows(plan) if feasible else [], layers_path(out),
                provenance(config_hash, device="", method=plan.method, model=plan.model, cluster=plan.cluster,
                           workload=plan.workload))
    side = {"llmpq_version": __version__, "host": platform.node(), "python": platform.python_version(),
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config_hash": config_hash, **meta}
    write_text(json.dumps(side, indent=2, sort_keys=True, default=str) + "\n", meta_path(out))
    return out


def summary(outcome: SolveOutcome, out: Path) -> str:
    p = outcome.plan
    layout = " | ".join(f"{s.device}@{s.node}[{s.start},{s.end})" for s in p.stages)
    gap = "n/a" if p.gap is None else f"{100 * p.gap:.2f}%"
    return (f"{out}: {p.method} {p.throughput_tok_s:.2f} tok/s predicted ({p.latency_source} latency), "
            f"Σω {p.omega:.4g} ({p.omega_source}), b_p={p.micro_batch_prefill} b_d={p.micro_batch_decode}, "
            f"{p.status} gap {gap} [{p.plan_source}] in {outcome.meta.get('solve_s', 0.0):.2f} s: {layout}")


def cli_solve(exp: Experiment, args: Any) -> int:
    """`llmpq solve model=M cluster=C workload=W solver=S [out=PATH] [indicator=NAME] [infeasible=fail|record]`."""
    exp, prompts = planning_experiment(exp)
    out = args.out or paths.plan_path(Path(args.results), exp.model.name, exp.cluster.name, exp.workload.name,
                                      exp.solver.name)
    try:
        outcome = solve(exp, Path(args.results), indicator=getattr(args, "indicator", None),
                        started=getattr(args, "started", None))
    except Infeasible as exc:
        if getattr(args, "infeasible", "fail") != "record":
            raise
        record = InfeasiblePlan(exp.solver.name, exp.model.name, exp.cluster.name, exp.workload.name, exc.kind,
                                str(exc), exc.report)
        write_plan(record, out, {"infeasible": exc.kind}, exp.config_hash)
        print(f"{out}: {exp.solver.name} is infeasible ({exc.kind}), recorded: {exc}")
        return 0
    if prompts is not None:
        outcome.plan = replace(outcome.plan, prompts=PlanPrompts(prompts.stats, exp.workload.gen_len))
    write_plan(outcome.plan, out, outcome.meta, exp.config_hash)
    print(summary(outcome, Path(out)))
    return 0
