"""Paper clusters: predicted throughput of every method on the 11 clusters of the LLM-PQ paper.

For each cluster config `paper-c*` and each of its workloads (the cluster's `model` and `workloads`):
the baselines (`pipeedge`, `uniform`, `adabits`), `heuristic`, `llmpq` without a quality budget, and
`llmpq` at each feasible baseline's quality (`budget_from`: Ω = that baseline's Σω, its plan among the
candidates). All throughputs are **cost-model predictions** — roofline latency from the device configs
(no GPU is profiled here) and the shape-only proxy ω — not measurements.

Keys: `rows` [{cluster, workload, method, budget_from, plan_source, throughput_tok_s, omega, solve_s,
status, gap}], per case `ratio_vs_best_baseline` = llmpq at the best baseline's quality / that baseline,
`mean_ratio_vs_best_baseline`, `min_ratio_vs_best_baseline`, `milp_share` (budget_from rows whose
winning plan came from the MILP), `max_solve_s`.

Run from the repository root: `python benchmarks/paper_clusters.py` (a few minutes on 2 cores);
writes `benchmarks/results/paper_clusters.json` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from llmpq.config import compose_experiment
from llmpq.costmodel.context import build_context
from llmpq.solve.baselines import BASELINES
from llmpq.solve.errors import BudgetInfeasible, MemoryInfeasible
from llmpq.solve.planner import solve
from llmpq.solve.quality import proxy_omega

OUT = Path("benchmarks/results/paper_clusters.json")
CLUSTERS = tuple(f"paper-c{i}" for i in range(1, 12))
NOTE = ("throughputs are cost-model predictions (roofline latency from device configs, shape-only proxy ω), "
        "not measurements")


def run_case(cluster: str, workload: str | None, results: Path) -> list[dict]:
    """All methods on one (cluster, workload); workload None = the cluster's first."""
    base = compose_experiment([f"cluster={cluster}"])
    model = base.cluster.model
    exp = compose_experiment([f"cluster={cluster}", f"model={model}", f"workload={workload}", "solver=llmpq"])
    ctx = build_context(exp, results)
    omega = proxy_omega(ctx.shape, tuple(sorted(exp.model.bits, reverse=True)))
    plans = [(m, None) for m in BASELINES] + [("heuristic", None), ("llmpq", None)]
    plans += [("llmpq", b) for b in BASELINES]
    rows, feasible = [], set()
    for method, budget_from in plans:
        if budget_from is not None and budget_from not in feasible:
            continue
        spec = replace(exp.solver, name=method, method=method, budget_from=budget_from)
        row = {"cluster": cluster, "workload": exp.workload.name, "model": model, "method": method,
               "budget_from": budget_from}
        started = time.monotonic()
        try:
            out = solve(replace(exp, solver=spec), results, ctx=ctx, omega=omega)
        except (MemoryInfeasible, BudgetInfeasible) as exc:
            row.update(plan_source=None, throughput_tok_s=None, omega=None, solve_s=time.monotonic() - started,
                       status="infeasible", gap=None, error=str(exc))
        else:
            p = out.plan
            row.update(plan_source=p.plan_source, throughput_tok_s=p.throughput_tok_s, omega=p.omega,
                       solve_s=time.monotonic() - started, status=p.status, gap=p.gap,
                       micro_batch=[p.micro_batch_prefill, p.micro_batch_decode], stages=len(p.stages),
                       bits=sorted(set(p.bits), reverse=True))
            if method in BASELINES:
                feasible.add(method)
        rows.append(row)
        print(f"  {cluster} {exp.workload.name} {method}{'@' + budget_from if budget_from else ''}: "
              f"{row['throughput_tok_s'] or 0:.2f} tok/s Σω {row['omega'] if row['omega'] is not None else '-'} "
              f"{row['status']} [{row['plan_source']}] {row['solve_s']:.2f} s", file=sys.stderr)
    return rows


def case_ratios(rows: list[dict]) -> dict:
    """llmpq at each baseline's quality over that baseline, and at the best baseline's."""
    base = {r["method"]: r for r in rows if r["method"] in BASELINES and r["throughput_tok_s"]}
    fair = {r["budget_from"]: r for r in rows if r["method"] == "llmpq" and r["budget_from"] and r["throughput_tok_s"]}
    ratios = {b: fair[b]["throughput_tok_s"] / base[b]["throughput_tok_s"] for b in base if b in fair}
    best = max(base, key=lambda b: base[b]["throughput_tok_s"]) if base else None
    return {"best_baseline": best, "ratio_vs_best_baseline": ratios.get(best), "ratio_vs_baseline": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", nargs="*", default=list(CLUSTERS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows, cases = [], []
    with tempfile.TemporaryDirectory() as empty:  # no profiles, links or sensitivity: roofline and proxy
        for cluster in args.clusters:
            for workload in compose_experiment([f"cluster={cluster}"]).cluster.workloads:
                case = run_case(cluster, workload, Path(empty))
                rows += case
                cases.append({"cluster": cluster, "workload": workload, **case_ratios(case)})
    best = [c["ratio_vs_best_baseline"] for c in cases if c["ratio_vs_best_baseline"] is not None]
    every = [r for c in cases for r in c["ratio_vs_baseline"].values()]
    fair = [r for r in rows if r["method"] == "llmpq" and r["budget_from"] and r["plan_source"]]
    result = {
        "note": NOTE,
        "rows": rows,
        "cases": cases,
        "mean_ratio_vs_best_baseline": sum(best) / len(best) if best else None,
        "min_ratio_vs_best_baseline": min(best) if best else None,
        "min_ratio_vs_any_baseline": min(every) if every else None,
        "milp_share": sum(r["plan_source"] == "milp" for r in fair) / len(fair) if fair else None,
        "max_solve_s": max(r["solve_s"] for r in rows),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.machine()},
        "wall_s": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"paper_clusters ({NOTE.split(' (')[0]}): {len(cases)} cases, llmpq vs best baseline at its quality "
          f"mean {result['mean_ratio_vs_best_baseline']:.2f}x min {result['min_ratio_vs_best_baseline']:.2f}x, "
          f"vs any baseline min {result['min_ratio_vs_any_baseline']:.2f}x, MILP plan in "
          f"{100 * (result['milp_share'] or 0):.0f}% of fair rows, slowest solve {result['max_solve_s']:.1f} s "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
