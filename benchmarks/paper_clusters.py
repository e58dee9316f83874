"""Paper clusters: predicted throughput of every method on the 11 clusters of the LLM-PQ paper.

For each cluster config `paper-c*` and each of its workloads (the cluster's `model` and `workloads`):
the baselines (`pipeedge`, `uniform`, `adabits`, `uniform-best`), `heuristic`, `llmpq` without a quality
budget, and `llmpq` at each feasible baseline's quality (`budget_from`: Ω = that baseline's Σω, its plan
among the candidates). All throughputs are **cost-model predictions** — the kernel-aware roofline from the
device configs and `conf/kernels.yaml` (no GPU is profiled here) — not measurements.

Every case runs with two kinds of ω:

- `proxy`: the shape-only proxy, the same for every layer (the count model applies; top-level keys);
- `per_layer` (key `per_layer_omega`): the proxy scaled by a measured per-layer pattern — the tiny model's
  sensitivity table (`--sensitivity`, default `results/sensitivity/tiny-opt.parquet`, written by the default
  workflow; its planning indicator's ω at 4 bits, divided by its mean), linearly interpolated over the layer
  index (`llmpq.solve.quality.scaled_omega`). The pattern used is recorded under `per_layer_omega.pattern`.
  Layers then differ, the MILP needs per-layer items, and grouping and refinement come into play.

Timing: `solve_s` is the wall time of one `solve` call, baselines included (llmpq at a baseline's quality runs
that baseline inside it); `process_s` (one row per case and ω kind: llmpq at adabits' quality, the heaviest)
is the wall time of `llmpq solve` as a process, imports included (the per-layer ω reaches it as a sensitivity
table named `per_layer_pattern` in a temporary results directory). Each kind's pass runs twice
(`--passes`, default 2): `identical_on_second_run` says whether every plan's bytes were the same.

Keys: `rows` [{cluster, workload, method, budget_from, plan_source, throughput_tok_s, omega, solve_s,
status, gap, bits, kernels}]; per case `ratio_vs_best_baseline` = llmpq at the best baseline's quality / that
baseline, `ratio_vs_uniform_best` = llmpq at `budget_from: uniform-best` / `uniform-best`, `bound_ratio` = that
llmpq plan's throughput / `upper_bound_tok_s` (the per-cluster roofline bound of
`llmpq.solve.bounds.throughput_upper_bound`: every phase's work perfectly balanced over all devices at each
device's fastest bit-width, kernel and micro-batch, ignoring memory and links; no plan can beat it), and
`gain_shares` {bits, partition, micro_batches}: (llmpq − llmpq with that part set back to uniform-best's) /
(llmpq − uniform-best), with the re-scored throughputs beside them. Per ω kind (top level for `proxy`, under
`per_layer_omega` for `per_layer`): `mean_ratio_vs_best_baseline`, `min_ratio_vs_best_baseline`,
`mean_ratio_vs_uniform_best`, `min_ratio_vs_uniform_best`, `min_bound_ratio`, `milp_share` (budget_from rows
whose winning plan came from the MILP, not a baseline's plan returned as llmpq's), `median_gap` (llmpq rows),
`max_solve_s`, `max_process_s`, `within_time_limit` (every solve ≤ time_limit_s + 1 s), `deadline_hits`,
`identical_on_second_run` (and `differs_on_second_run`: the rows that did not), `plans_sha256`; each row has
its plan's `plan_sha256`.

Run from the repository root: `python benchmarks/paper_clusters.py` (on 2 cores about 15 minutes: two passes
of both kinds); writes `benchmarks/results/paper_clusters.json` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from llmpq import paths
from llmpq.artifacts import provenance, read_table, write_table
from llmpq.config import compose_experiment
from llmpq.costmodel.context import build_context
from llmpq.costmodel.estimate import StageAssignment, estimate
from llmpq.solve.bounds import throughput_upper_bound
from llmpq.solve.errors import BudgetInfeasible, MemoryInfeasible, SolveTimeout
from llmpq.solve.methods import BASELINES
from llmpq.solve.plan import Plan, to_json
from llmpq.solve.planner import solve
from llmpq.solve.quality import OmegaTable, indicator_omega, layer_pattern, proxy_omega, scaled_omega
from llmpq.solve.tables import CostCache

OUT = Path("benchmarks/results/paper_clusters.json")
SENSITIVITY = Path("results/sensitivity/tiny-opt.parquet")
CLUSTERS = tuple(f"paper-c{i}" for i in range(1, 12))
KINDS = ("proxy", "per_layer")
PATTERN_INDICATOR = "per_layer_pattern"  # the name the per-layer ω has in the process run's sensitivity table
NOTE = ("throughputs are cost-model predictions (kernel-aware roofline latency from device configs and "
        "conf/kernels.yaml; proxy ω, and the proxy scaled by a measured per-layer pattern), not measurements")
BOUND = ("per-cluster roofline bound: each phase's layer work perfectly balanced over all devices at each device's "
         "fastest bit-width, kernel and micro-batch size, ignoring memory, links, embedding and head")


def tiny_pattern(path: Path) -> tuple[float, ...]:
    """The per-layer pattern of a measured sensitivity table (its default indicator's ω at 4 bits, mean 1)."""
    if not path.is_file():
        raise SystemExit(f"{path}: no sensitivity table; run the default workflow first (`snakemake --cores 2`) or "
                         "pass --sensitivity PATH")
    layers = len({r["layer"] for r in read_table("sensitivity", path).to_pylist()})
    table = indicator_omega(path, layers, (16, 8, 4, 3, 2), None)
    return tuple(float(x) for x in layer_pattern(table, 4))


def omega_of_kind(kind: str, shape, bits: tuple[int, ...], pattern: tuple[float, ...]) -> OmegaTable:
    proxy = proxy_omega(shape, bits)
    return proxy if kind == "proxy" else scaled_omega(proxy, pattern)


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


def process_seconds(exp, kind: str, omega: OmegaTable, results: Path) -> float:
    """Wall time of `llmpq solve` as a process for llmpq at adabits' quality (imports included); the per-layer ω
    reaches it as a sensitivity table in `results`."""
    if kind == "per_layer":
        rows = [{"layer": i, "bits": b, "indicator": PATTERN_INDICATOR, "omega": float(omega.values[i, c])}
                for i in range(omega.num_layers) for c, b in enumerate(omega.bits)]
        write_table("sensitivity", rows, paths.sensitivity_path(results, exp.model.name), provenance())
    out = results / "process.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llmpq.cli", "solve", f"cluster={exp.cluster.name}",
                           f"model={exp.model.name}", f"workload={exp.workload.name}", "solver=llmpq-vs-adabits",
                           f"results={results}", f"out={out}"], capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"llmpq solve failed: {proc.stderr.strip()}")
    return wall


def run_case(cluster: str, workload: str, kind: str, pattern: tuple[float, ...], results: Path,
             timed_process: bool) -> tuple[list[dict], dict, list[str]]:
    """All methods on one (cluster, workload) with one ω kind: rows, the case's llmpq vs uniform-best analysis, and
    the canonical JSON of every plan (for the identical-second-run check)."""
    base = compose_experiment([f"cluster={cluster}"])
    model = base.cluster.model
    exp = compose_experiment([f"cluster={cluster}", f"model={model}", f"workload={workload}", "solver=llmpq"])
    ctx = build_context(exp, results)
    omega = omega_of_kind(kind, ctx.shape, tuple(sorted(exp.model.bits, reverse=True)), pattern)
    plans = [(m, None) for m in BASELINES] + [("heuristic", None), ("llmpq", None)]
    plans += [("llmpq", b) for b in BASELINES]
    rows, feasible, made, texts = [], set(), {}, []
    for method, budget_from in plans:
        if budget_from is not None and budget_from not in feasible:
            continue
        spec = replace(exp.solver, name=method, method=method, budget_from=budget_from, default_budget=None)
        row = {"cluster": cluster, "workload": exp.workload.name, "model": model, "omega_kind": kind,
               "method": method, "budget_from": budget_from}
        started = time.monotonic()
        try:
            out = solve(replace(exp, solver=spec), results, ctx=ctx, omega=omega)
        except (MemoryInfeasible, BudgetInfeasible, SolveTimeout) as exc:
            row.update(plan_source=None, throughput_tok_s=None, omega=None, solve_s=time.monotonic() - started,
                       status="infeasible" if not isinstance(exc, SolveTimeout) else "timeout", gap=None,
                       error=str(exc))
            texts.append(f"{method}@{budget_from}: {exc}")
        else:
            p = out.plan
            row.update(plan_source=p.plan_source, throughput_tok_s=p.throughput_tok_s, omega=p.omega,
                       solve_s=time.monotonic() - started, status=p.status, gap=p.gap,
                       deadline_hit=out.meta["deadline_hit"], layers_per_item=out.meta.get("layers_per_item"),
                       refined_from=out.meta.get("refined_from") or None,
                       micro_batch=[p.micro_batch_prefill, p.micro_batch_decode], stages=len(p.stages),
                       bits=sorted(set(p.bits), reverse=True),
                       kernels=sorted({f"{s.device}:{b}:{k}" for s in p.stages for b, k in s.kernels}))
            made[(method, budget_from)] = p
            texts.append(to_json(p))
            row["plan_sha256"] = hashlib.sha256(texts[-1].encode()).hexdigest()
            if method in BASELINES:
                feasible.add(method)
        rows.append(row)
        print(f"  {cluster} {exp.workload.name} [{kind}] {method}{'@' + budget_from if budget_from else ''}: "
              f"{row['throughput_tok_s'] or 0:.2f} tok/s Σω {row['omega'] if row['omega'] is not None else '-'} "
              f"{row['status']} [{row['plan_source']}] {row['solve_s']:.2f} s", file=sys.stderr)
    if timed_process and "adabits" in feasible:
        with tempfile.TemporaryDirectory() as scratch:
            row = next(r for r in rows if r["method"] == "llmpq" and r["budget_from"] == "adabits")
            row["process_s"] = process_seconds(exp, kind, omega, Path(scratch))
    bound = throughput_upper_bound(CostCache(ctx))
    analysis: dict = {"upper_bound_tok_s": bound}
    best, ub = made.get(("llmpq", "uniform-best")), made.get(("uniform-best", None))
    if best is not None and ub is not None:
        analysis.update(ratio_vs_uniform_best=best.throughput_tok_s / ub.throughput_tok_s,
                        bound_ratio=best.throughput_tok_s / bound, omega_llmpq=best.omega, omega_uniform_best=ub.omega,
                        gain_shares=gain_shares(ctx, best, ub))
    return rows, analysis, texts


def case_ratios(rows: list[dict]) -> dict:
    """llmpq at each baseline's quality over that baseline, and at the best baseline's."""
    base = {r["method"]: r for r in rows if r["method"] in BASELINES and r["throughput_tok_s"]}
    fair = {r["budget_from"]: r for r in rows if r["method"] == "llmpq" and r["budget_from"] and r["throughput_tok_s"]}
    ratios = {b: fair[b]["throughput_tok_s"] / base[b]["throughput_tok_s"] for b in base if b in fair}
    best = max(base, key=lambda b: base[b]["throughput_tok_s"]) if base else None
    return {"best_baseline": best, "ratio_vs_best_baseline": ratios.get(best), "ratio_vs_baseline": ratios}


def row_key(row: dict) -> str:
    return f"{row['cluster']}/{row['workload']}/{row['method']}" + (f"@{row['budget_from']}" if row["budget_from"] else "")


def one_pass(kind: str, clusters: list[str], pattern: tuple[float, ...], timed_process: bool):
    rows, cases, texts = [], [], []
    with tempfile.TemporaryDirectory() as empty:  # no profiles, links or sensitivity: roofline latency
        for cluster in clusters:
            for workload in compose_experiment([f"cluster={cluster}"]).cluster.workloads:
                case, analysis, plans = run_case(cluster, workload, kind, pattern, Path(empty), timed_process)
                rows += case
                texts += plans
                cases.append({"cluster": cluster, "workload": workload, **case_ratios(case), **analysis})
    return rows, cases, hashlib.sha256("".join(texts).encode()).hexdigest()


def summarise(rows: list[dict], cases: list[dict], digest: str, again: list[dict] | None, time_limit: float) -> dict:
    """The per-kind keys (module docstring); `again`: the second pass's rows."""
    best = [c["ratio_vs_best_baseline"] for c in cases if c["ratio_vs_best_baseline"] is not None]
    every = [r for c in cases for r in c["ratio_vs_baseline"].values()]
    vs_ub = [c["ratio_vs_uniform_best"] for c in cases if c.get("ratio_vs_uniform_best") is not None]
    bound = [c["bound_ratio"] for c in cases if c.get("bound_ratio") is not None]
    fair = [r for r in rows if r["method"] == "llmpq" and r["budget_from"] and r["plan_source"]]
    gaps = [r["gap"] for r in rows if r["method"] == "llmpq" and r["gap"] is not None]
    process = [r["process_s"] for r in rows if "process_s" in r]
    return {
        "mean_ratio_vs_best_baseline": sum(best) / len(best) if best else None,
        "min_ratio_vs_best_baseline": min(best) if best else None,
        "min_ratio_vs_any_baseline": min(every) if every else None,
        "mean_ratio_vs_uniform_best": sum(vs_ub) / len(vs_ub) if vs_ub else None,
        "min_ratio_vs_uniform_best": min(vs_ub) if vs_ub else None,
        "min_bound_ratio": min(bound) if bound else None,
        "milp_share": sum(r["plan_source"] == "milp" for r in fair) / len(fair) if fair else None,
        "median_gap": statistics.median(gaps) if gaps else None,
        "max_solve_s": max(r["solve_s"] for r in rows),
        "max_process_s": max(process) if process else None,
        "within_time_limit": all(r["solve_s"] <= time_limit + 1.0 for r in rows),
        "deadline_hits": sum(bool(r.get("deadline_hit")) for r in rows),
        "plans_sha256": digest,
        "identical_on_second_run": None if again is None else not differing(rows, again),
        "differs_on_second_run": None if again is None else differing(rows, again),
    }


def differing(rows: list[dict], again: list[dict]) -> list[str]:
    """Rows whose plan (or error) is not the same in both passes."""
    first = {row_key(r): r.get("plan_sha256") or r.get("error") for r in rows}
    second = {row_key(r): r.get("plan_sha256") or r.get("error") for r in again}
    return sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", nargs="*", default=list(CLUSTERS))
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    parser.add_argument("--sensitivity", type=Path, default=SENSITIVITY)
    parser.add_argument("--passes", type=int, default=2, choices=(1, 2))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    started = time.monotonic()
    pattern = tiny_pattern(args.sensitivity) if "per_layer" in args.kinds else ()
    time_limit = float(compose_experiment(["solver=llmpq"]).solver.time_limit_s)
    result: dict = {"note": NOTE, "bound": BOUND, "rows": [], "cases": []}
    for kind in args.kinds:
        rows, cases, digest = one_pass(kind, args.clusters, pattern, timed_process=True)
        again = one_pass(kind, args.clusters, pattern, timed_process=False)[0] if args.passes == 2 else None
        keys = summarise(rows, cases, digest, again, time_limit)
        result["rows"] += rows
        if kind == "proxy":
            result["cases"] = cases
            result.update(keys)
        else:
            result["per_layer_omega"] = {**keys, "cases": cases, "sensitivity": str(args.sensitivity),
                                         "pattern": list(pattern)}
    result.update(time_limit_s=time_limit, machine={"cpus": os.cpu_count(), "python": platform.python_version(),
                                                    "processor": platform.machine(),
                                                    "load_average": list(os.getloadavg())},
                  wall_s=time.monotonic() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"paper_clusters ({NOTE.split(' (')[0]}): " + "; ".join(
        f"{kind}: llmpq vs uniform-best at its quality mean {k['mean_ratio_vs_uniform_best'] or 0:.2f}x, MILP plan in "
        f"{100 * (k['milp_share'] or 0):.0f}% of fair rows, median gap {100 * (k['median_gap'] or 0):.2f}%, slowest "
        f"solve {k['max_solve_s']:.1f} s (process {k['max_process_s'] or 0:.1f} s), identical on a second run: "
        f"{k['identical_on_second_run']}"
        for kind, k in (("proxy", result), ("per-layer ω", result.get("per_layer_omega"))) if k and "milp_share" in k)
        + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
