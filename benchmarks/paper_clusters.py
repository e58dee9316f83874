"""Paper clusters: predicted throughput of every method on the 11 clusters of the LLM-PQ paper.

For each cluster config `paper-c*` and each of its workloads (the cluster's `model` and `workloads`):
the baselines (`pipeedge`, `uniform`, `adabits`, `uniform-best`), `heuristic`, `llmpq` without a quality
budget, and `llmpq` at each feasible baseline's quality (`budget_from`: Ω = that baseline's Σω, its plan
among the candidates). All throughputs are **cost-model predictions** — the kernel-aware roofline from the
device configs and `conf/kernels.yaml` (no GPU is profiled here) and the shape-only proxy ω — not
measurements.

Keys: `rows` [{cluster, workload, method, budget_from, plan_source, throughput_tok_s, omega, solve_s,
status, gap, bits, kernels}]; per case `ratio_vs_best_baseline` = llmpq at the best baseline's quality / that
baseline, `ratio_vs_uniform_best` = llmpq at `budget_from: uniform-best` / `uniform-best`, `bound_ratio` = that
llmpq plan's throughput / `upper_bound_tok_s` (the per-cluster roofline bound of
`llmpq.solve.bounds.throughput_upper_bound`: every phase's work perfectly balanced over all devices at each
device's fastest bit-width, kernel and micro-batch, ignoring memory and links; no plan can beat it), and
`gain_shares` {bits, partition, micro_batches}: (llmpq − llmpq with that part set back to uniform-best's) /
(llmpq − uniform-best), with the re-scored throughputs beside them; top level `mean_ratio_vs_best_baseline`,
`min_ratio_vs_best_baseline`, `mean_ratio_vs_uniform_best`, `min_ratio_vs_uniform_best`, `min_bound_ratio`,
`milp_share` (budget_from rows whose winning plan came from the MILP), `max_solve_s`.

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
from llmpq.costmodel.estimate import StageAssignment, estimate
from llmpq.solve.methods import BASELINES
from llmpq.solve.bounds import throughput_upper_bound
from llmpq.solve.errors import BudgetInfeasible, MemoryInfeasible
from llmpq.solve.plan import Plan
from llmpq.solve.planner import solve
from llmpq.solve.quality import proxy_omega
from llmpq.solve.tables import CostCache

OUT = Path("benchmarks/results/paper_clusters.json")
CLUSTERS = tuple(f"paper-c{i}" for i in range(1, 12))
NOTE = ("throughputs are cost-model predictions (kernel-aware roofline latency from device configs and "
        "conf/kernels.yaml, shape-only proxy ω), not measurements")
BOUND = ("per-cluster roofline bound: each phase's layer work perfectly balanced over all devices at each device's "
         "fastest bit-width, kernel and micro-batch size, ignoring memory, links, embedding and head")


def stages_of(plan: Plan, bits: tuple[int, ...] | None = None) -> list[StageAssignment]:
    """A plan's stages (kernels chosen again by the estimator), optionally with other per-layer bits."""
    bits = bits or plan.bits
    return [StageAssignment(s.device, s.node, s.start, s.end, bits[s.start:s.end]) for s in plan.stages]


def rescore(ctx, stages: list[StageAssignment], b_p: int, b_d: int) -> dict:
    try:
        e = estimate(ctx, stages, b_p, b_d)
    except ValueError as exc:  # a bit-width without a kernel on the device that would hold it
        return {"throughput_tok_s": None, "fits": False, "error": str(exc)}
    return {"throughput_tok_s": e.throughput_tok_s, "fits": e.fits}


def gain_shares(ctx, best: Plan, base: Plan) -> dict:
    """The share of llmpq's gain over uniform-best from its bits, its partition and its micro-batches: the llmpq plan
    re-scored with each set back to uniform-best's (module docstring)."""
    gain = best.throughput_tok_s - base.throughput_tok_s
    variants = {
        "bits": rescore(ctx, stages_of(best, (base.bits[0],) * best.num_layers), best.micro_batch_prefill,
                        best.micro_batch_decode),
        "partition": rescore(ctx, [StageAssignment(s.device, s.node, s.start, s.end, best.bits[s.start:s.end])
                                   for s in base.stages], best.micro_batch_prefill, best.micro_batch_decode),
        "micro_batches": rescore(ctx, stages_of(best), base.micro_batch_prefill, base.micro_batch_decode),
    }
    for v in variants.values():
        t = v["throughput_tok_s"]
        v["share"] = (best.throughput_tok_s - t) / gain if t is not None and gain > 1e-9 else None
    return variants


def run_case(cluster: str, workload: str | None, results: Path) -> tuple[list[dict], dict]:
    """All methods on one (cluster, workload); workload None = the cluster's first. Rows, and the case's llmpq vs
    uniform-best analysis."""
    base = compose_experiment([f"cluster={cluster}"])
    model = base.cluster.model
    exp = compose_experiment([f"cluster={cluster}", f"model={model}", f"workload={workload}", "solver=llmpq"])
    ctx = build_context(exp, results)
    omega = proxy_omega(ctx.shape, tuple(sorted(exp.model.bits, reverse=True)))
    plans = [(m, None) for m in BASELINES] + [("heuristic", None), ("llmpq", None)]
    plans += [("llmpq", b) for b in BASELINES]
    rows, feasible, made = [], set(), {}
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
                       bits=sorted(set(p.bits), reverse=True),
                       kernels=sorted({f"{s.device}:{b}:{k}" for s in p.stages for b, k in s.kernels}))
            made[(method, budget_from)] = p
            if method in BASELINES:
                feasible.add(method)
        rows.append(row)
        print(f"  {cluster} {exp.workload.name} {method}{'@' + budget_from if budget_from else ''}: "
              f"{row['throughput_tok_s'] or 0:.2f} tok/s Σω {row['omega'] if row['omega'] is not None else '-'} "
              f"{row['status']} [{row['plan_source']}] {row['solve_s']:.2f} s", file=sys.stderr)
    bound = throughput_upper_bound(CostCache(ctx))
    analysis: dict = {"upper_bound_tok_s": bound}
    best, ub = made.get(("llmpq", "uniform-best")), made.get(("uniform-best", None))
    if best is not None and ub is not None:
        analysis.update(ratio_vs_uniform_best=best.throughput_tok_s / ub.throughput_tok_s,
                        bound_ratio=best.throughput_tok_s / bound, omega_llmpq=best.omega, omega_uniform_best=ub.omega,
                        gain_shares=gain_shares(ctx, best, ub))
    return rows, analysis


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
                case, analysis = run_case(cluster, workload, Path(empty))
                rows += case
                cases.append({"cluster": cluster, "workload": workload, **case_ratios(case), **analysis})
    best = [c["ratio_vs_best_baseline"] for c in cases if c["ratio_vs_best_baseline"] is not None]
    every = [r for c in cases for r in c["ratio_vs_baseline"].values()]
    vs_ub = [c["ratio_vs_uniform_best"] for c in cases if c.get("ratio_vs_uniform_best") is not None]
    bound = [c["bound_ratio"] for c in cases if c.get("bound_ratio") is not None]
    fair = [r for r in rows if r["method"] == "llmpq" and r["budget_from"] and r["plan_source"]]
    result = {
        "note": NOTE,
        "bound": BOUND,
        "rows": rows,
        "cases": cases,
        "mean_ratio_vs_best_baseline": sum(best) / len(best) if best else None,
        "min_ratio_vs_best_baseline": min(best) if best else None,
        "min_ratio_vs_any_baseline": min(every) if every else None,
        "mean_ratio_vs_uniform_best": sum(vs_ub) / len(vs_ub) if vs_ub else None,
        "min_ratio_vs_uniform_best": min(vs_ub) if vs_ub else None,
        "min_bound_ratio": min(bound) if bound else None,
        "cases_within_10s": all(r["solve_s"] <= 10.0 for r in rows),
        "milp_share": sum(r["plan_source"] == "milp" for r in fair) / len(fair) if fair else None,
        "max_solve_s": max(r["solve_s"] for r in rows),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.machine()},
        "wall_s": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"paper_clusters ({NOTE.split(' (')[0]}): {len(cases)} cases, llmpq vs uniform-best at its quality "
          f"mean {result['mean_ratio_vs_uniform_best']:.2f}x min {result['min_ratio_vs_uniform_best']:.2f}x, "
          f"plan / upper bound min {result['min_bound_ratio']:.2f}; "
          f"vs best baseline mean {result['mean_ratio_vs_best_baseline']:.2f}x min {result['min_ratio_vs_best_baseline']:.2f}x, "
          f"vs any baseline min {result['min_ratio_vs_any_baseline']:.2f}x, MILP plan in "
          f"{100 * (result['milp_share'] or 0):.0f}% of fair rows, slowest solve {result['max_solve_s']:.1f} s "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
