"""`llmpq evaluate`: every method's plan and run for one model x cluster x workload, side by side."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from .. import paths
from ..artifacts import provenance, read_table, write_table, write_text
from . import plots

BASELINES = ("pipeedge", "uniform", "adabits")


@dataclass(frozen=True)
class MethodResult:
    """One method's plan and measured run, reduced to what the comparison needs."""

    method: str
    measured_tok_s: float
    predicted_tok_s: float
    prefill_rel_error: float
    decode_rel_error: float
    perplexity: float
    omega: float


def _phase_wall_ms(runs, phase: str) -> float:
    rows = runs.filter(pc.equal(runs["phase"], phase))
    return float(pc.max(rows["wall_ms"]).as_py()) if rows.num_rows else math.nan


def rel_error(measured: float, predicted: float) -> float:
    """(measured − predicted) / predicted; NaN when there is no prediction."""
    return (measured - predicted) / predicted if predicted else math.nan


def method_result(method: str, plan: dict, runs, perplexity: float) -> MethodResult:
    """Measured vs predicted for one method from its plan JSON and its `runs` table."""
    predicted = plan["predicted"]
    prefill_ms, decode_ms = _phase_wall_ms(runs, "prefill"), _phase_wall_ms(runs, "decode")
    tokens = int(pc.max(runs["tokens"]).as_py())
    measured = tokens / ((prefill_ms + (0 if math.isnan(decode_ms) else decode_ms)) / 1e3)
    return MethodResult(
        method=method,
        measured_tok_s=measured,
        predicted_tok_s=float(predicted["throughput_tok_s"]),
        prefill_rel_error=rel_error(prefill_ms, 1e3 * predicted["prefill_s"]),
        decode_rel_error=rel_error(decode_ms, 1e3 * predicted["decode_s"]) if predicted["decode_s"] else math.nan,
        perplexity=perplexity,
        omega=float(plan.get("quality", {}).get("omega") or 0.0),
    )


def stage_memory_rows(method: str, plan: dict, runs) -> list[dict]:
    """Per stage: capacity, the plan's predicted bytes (all parts) and the run's measured peak."""
    rows = []
    for k, stage in enumerate(plan["stages"]):
        memory = dict(stage["memory"])
        capacity = int(memory.pop("capacity_bytes"))
        measured = runs.filter(pc.equal(runs["stage"], k))["peak_memory_bytes"]
        rows.append({"method": method, "stage": k, "device": stage["device"],
                     "layers": stage["layers"][1] - stage["layers"][0], "capacity_bytes": capacity,
                     "predicted_bytes": int(sum(memory.values())),
                     "measured_peak_bytes": int(pc.max(measured).as_py() or 0) if len(measured) else 0})
    return rows


def ratio_vs_best_baseline(results: list[MethodResult]) -> dict[str, float]:
    """Measured throughput of each non-baseline method over the best baseline's."""
    best = max((r.measured_tok_s for r in results if r.method in BASELINES), default=math.nan)
    return {r.method: (r.measured_tok_s / best if r.method not in BASELINES and best == best else math.nan) for r in results}


def summary_markdown(title: str, results: list[MethodResult], ratios: dict[str, float]) -> str:
    """A short table a person reads at the end of a run."""
    lines = [f"### {title}", "", "| method | measured tok/s | predicted tok/s | prefill err | decode err | perplexity | Σω | vs best baseline |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = ratios.get(r.method, math.nan)
        lines.append(f"| {r.method} | {r.measured_tok_s:.1f} | {r.predicted_tok_s:.1f} | {r.prefill_rel_error:+.1%} | "
                     f"{r.decode_rel_error:+.1%} | {r.perplexity:.2f} | {r.omega:.3g} | {'' if ratio != ratio else f'{ratio:.2f}x'} |")
    return "\n".join(lines) + "\n"


def figure_dir(eval_file: Path) -> Path:
    return eval_file.with_suffix("")


def cli_evaluate(exp, args) -> int:
    """Evaluate every method that has both a plan and a run for the experiment's model x cluster x workload."""
    from ..models.source import model_dir
    from .perplexity import EvalSpec, eval_token_ids

    model, cluster, workload = exp.model.name, exp.cluster.name, exp.workload.name
    plan_dir = paths.plan_path(args.results, model, cluster, workload, "x").parent
    out = args.out or paths.eval_path(args.results, model, cluster, workload)
    weights = model_dir(exp.model, results=args.results)
    if weights is None:
        raise FileNotFoundError(f"model {exp.model.name}: source {exp.model.source!r} has no local weights to evaluate")
    spec = EvalSpec.from_raw(exp.raw["eval"])
    token_ids = eval_token_ids(weights, spec)
    ppl_of: dict[tuple, float] = {}
    plans, results, stage_rows = {}, [], []
    for plan_file in sorted(plan_dir.glob("*.json")):
        if plan_file.name.endswith(".meta.json"):
            continue
        method = plan_file.stem
        run_file = paths.run_path(args.results, model, cluster, workload, method)
        if not run_file.is_file():
            continue
        plan = json.loads(plan_file.read_text())
        plans[method] = plan
        ppl = _plan_perplexity(plan_file, weights, spec, token_ids, args.results, model, ppl_of)
        runs = read_table("runs", run_file)
        results.append(method_result(method, plan, runs, ppl))
        stage_rows.extend(stage_memory_rows(method, plan, runs))
        print(f"evaluated {method}: {results[-1].measured_tok_s:.1f} tok/s measured, perplexity {ppl:.2f}", flush=True)
    if not results:
        raise FileNotFoundError(f"{plan_dir}: no plan with a matching run to evaluate")
    ratios = ratio_vs_best_baseline(results)
    rows = [{**vars(r), "ratio_vs_best_baseline": ratios[r.method]} for r in results]
    figures = figure_dir(Path(out))
    plots.plot_plans(plans, figures / "plan.png")
    plots.plot_throughput([r.method for r in results], [r.measured_tok_s for r in results],
                          [r.predicted_tok_s for r in results], figures / "throughput.png")
    plots.plot_quality([r.method for r in results], [r.measured_tok_s for r in results],
                       [r.perplexity for r in results], figures / "quality.png")
    _fidelity_figure(exp, args.results, figures / "fidelity.png")
    text = summary_markdown(f"{model} on {cluster}, workload {workload}", results, ratios)
    write_text(text, figures / "summary.md")
    write_table("eval_stages", stage_rows, figures / "stages.parquet", provenance(exp.config_hash))
    write_table("eval", rows, out, provenance(exp.config_hash, extra_methods=sorted(plans)))
    print(text)
    return 0


def _plan_perplexity(plan_file: Path, weights: Path, spec, token_ids, results: Path, model: str,
                     cache: dict[tuple, float]) -> float:
    """Perplexity of the plan's exact per-layer weights (memoised on bits and scheme: methods often agree)."""
    from .perplexity import model_perplexity, read_plan_bits

    plan_bits = read_plan_bits(plan_file)
    key = (plan_bits.bits, plan_bits.scheme)
    if key not in cache:
        cache[key] = model_perplexity(weights, spec, list(plan_bits.bits), paths.quant_root(results, model),
                                      plan_bits.scheme, token_ids=token_ids).perplexity
    return cache[key]


def _fidelity_figure(exp, results: Path, path: Path) -> Path:
    """Cost-model latency vs every profiled point of the cluster's present devices."""
    from ..costmodel.latency import build_latency_model
    from ..models.source import model_shape

    profiles = {d: paths.profile_path(results, d, exp.model.name) for d in exp.cluster.device_stems()}
    profiles = {d: p for d, p in profiles.items() if p.is_file()}
    shape = model_shape(exp.model)
    latency = build_latency_model(shape, exp.devices, exp.model.quant, profiles)
    measured, predicted, labels = [], [], []
    for device, path_ in profiles.items():
        for row in read_table("profile", path_).to_pylist():
            if row["component"] != "layer":
                continue
            measured.append(row["latency_ms"])
            predicted.append(latency.layer_ms(device, row["bits"], row["phase"], row["batch"], row["q_tokens"], row["context_len"]))
            labels.append(f"{device} {row['phase']}")
    return plots.plot_fidelity(measured, predicted, labels, path)
