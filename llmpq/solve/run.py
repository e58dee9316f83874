"""`llmpq solve`: plan one model × cluster × workload with the configured solver and write the artifacts.

Writes `<out>` (default `results/plans/{model}/{cluster}/{workload}/{solver}.json`, canonical JSON),
`<out stem>.parquet` (the `plan_layers` table) and `<out stem>.meta.json` (solve time, host, counters).
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

from .plan import Plan, PlanPrompts, layer_rows, layers_path, meta_path, to_json
from .planner import SolveOutcome, solve


def write_plan(plan: Plan, out: Path, meta: dict[str, Any], config_hash: str = "") -> Path:
    """Write the plan JSON, its plan_layers table and its sidecar; returns the plan path."""
    out = Path(out)
    write_text(to_json(plan), out)
    write_table("plan_layers", layer_rows(plan), layers_path(out),
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
    """`llmpq solve model=M cluster=C workload=W solver=S [out=PATH] [indicator=NAME]`."""
    exp, prompts = planning_experiment(exp)
    outcome = solve(exp, Path(args.results), indicator=getattr(args, "indicator", None))
    if prompts is not None:
        outcome.plan = replace(outcome.plan, prompts=PlanPrompts(prompts.stats, exp.workload.gen_len))
    out = args.out or paths.plan_path(Path(args.results), exp.model.name, exp.cluster.name, exp.workload.name,
                                      exp.solver.name)
    write_plan(outcome.plan, out, outcome.meta, exp.config_hash)
    print(summary(outcome, Path(out)))
    return 0
