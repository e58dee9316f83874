"""`llmpq evaluate`: every method's plan and run for one model x cluster x workload, side by side.

Where `llmpq generate` has run a method's plan over the workload's prompts file, its measured tokens/s
(Σ generated tokens / Σ wall time over the `generate_runs` rows) stands beside the plan's prediction.

Comparisons a user can trust (`compare`): each deploy ran the schedule several times, so a method's measured
tokens/s has a spread (from the slowest and fastest runs of each phase); a ratio to the best baseline whose
spread overlaps the baseline's is marked within noise (the baseline is the one named below); methods whose plans are identical (same stages,
bits and micro-batches) are reported as identical instead of ranked; and where a run's idle reference
timing says the machine was loaded (`llmpq.profile.reference`), the ranking is withheld.

"vs best baseline" is fair: each non-baseline plan is compared only with the baselines of equal or worse
quality (Σω at least its own, or measured perplexity at least its own), and the table names the baseline it
was compared with. A method recorded as infeasible (its plan says so) is listed with its status and no numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import pyarrow.compute as pc

from .. import paths
from ..artifacts import provenance, read_table, write_table, write_text
from ..generate.outputs import runs_path
from ..profile.load import LOADED_FACTOR, busy_machine, is_loaded
from ..progress import bar as console_bar
from ..solve.methods import is_baseline
from ..solve.plan import is_infeasible
from . import plots
from .summary import same_plan

OMEGA_TOL = 1e-9  # relative: Σω equal within rounding counts as equal quality


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
    generate_tok_s: float = math.nan
    generate_predicted_tok_s: float = math.nan
    generate_rel_error: float = math.nan
    measured_tok_s_min: float = math.nan    # from the slowest run of each phase
    measured_tok_s_max: float = math.nan    # from the fastest
    repeats: int = 1
    load_factor: float = math.nan           # the largest over the run's stages
    plan_status: str = ""      # the plan's solver.status (optimal, feasible, timeout, infeasible)


@dataclass(frozen=True)
class Comparison:
    """A method against the fastest baseline of equal or worse quality (`compared_with`): the ratio of measured
    tokens/s, whether the spreads overlap, the method whose plan it repeats (if any), and the text the summary
    shows."""

    ratio: float
    compared_with: str
    within_noise: bool
    identical_to: str
    text: str


def infeasible_result(method: str, plan: dict) -> MethodResult:
    """A method recorded as infeasible: its status, no measurements."""
    nan = math.nan
    return MethodResult(method=method, measured_tok_s=nan, predicted_tok_s=nan, prefill_rel_error=nan,
                        decode_rel_error=nan, perplexity=nan, omega=nan,
                        plan_status=f"infeasible ({plan['infeasible']['kind']})")


def generate_throughput(rows: list[dict]) -> float:
    """Measured tokens/s of a batch job over all its recorded runs: Σ generated tokens / Σ wall time."""
    wall = sum(r["wall_s"] for r in rows)
    return sum(r["generated_tokens"] for r in rows) / wall if wall > 0 else math.nan


def with_generate(result: MethodResult, plan: dict, generate_runs: Path) -> MethodResult:
    """The method's result with its batch job's measured and predicted tokens/s, if the job has run."""
    if not generate_runs.is_file():
        return result
    measured = generate_throughput(read_table("generate_runs", generate_runs).to_pylist())
    predicted = float(plan["predicted"]["throughput_tok_s"])
    return replace(result, generate_tok_s=measured, generate_predicted_tok_s=predicted,
                   generate_rel_error=rel_error(measured, predicted))


def _phase_wall_ms(runs, phase: str, column: str = "wall_ms") -> float:
    rows = runs.filter(pc.equal(runs["phase"], phase))
    return float(pc.max(rows[column]).as_py()) if rows.num_rows else math.nan


def rel_error(measured: float, predicted: float) -> float:
    """(measured − predicted) / predicted; NaN when there is no prediction."""
    return (measured - predicted) / predicted if predicted else math.nan


def method_result(method: str, plan: dict, runs, perplexity: float) -> MethodResult:
    """Measured vs predicted for one method from its plan JSON and its `runs` table."""
    predicted = plan["predicted"]
    prefill_ms, decode_ms = _phase_wall_ms(runs, "prefill"), _phase_wall_ms(runs, "decode")
    tokens = int(pc.max(runs["tokens"]).as_py())

    def tok_s(column: str) -> float:
        decode = _phase_wall_ms(runs, "decode", column)
        return tokens / ((_phase_wall_ms(runs, "prefill", column) + (0 if math.isnan(decode) else decode)) / 1e3)

    measured = tok_s("wall_ms")
    factors = [f for f in runs["load_factor"].to_pylist() if f == f]
    return MethodResult(
        method=method,
        measured_tok_s=measured,
        predicted_tok_s=float(predicted["throughput_tok_s"]),
        prefill_rel_error=rel_error(prefill_ms, 1e3 * predicted["prefill_s"]),
        decode_rel_error=rel_error(decode_ms, 1e3 * predicted["decode_s"]) if predicted["decode_s"] else math.nan,
        perplexity=perplexity,
        omega=float(plan.get("quality", {}).get("omega") or 0.0),
        measured_tok_s_min=tok_s("wall_ms_max"), measured_tok_s_max=tok_s("wall_ms_min"),
        repeats=int(pc.min(runs["repeats"]).as_py()), load_factor=max(factors) if factors else math.nan,
        plan_status=plan.get("solver", {}).get("status", ""),
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


def comparable(plan: MethodResult, baseline: MethodResult) -> bool:
    """Whether `baseline` is of equal or worse quality than `plan`: Σω at least the plan's (within rounding), or
    measured perplexity at least the plan's."""
    omega = baseline.omega >= plan.omega * (1 - OMEGA_TOL) - OMEGA_TOL
    ppl = baseline.perplexity == baseline.perplexity and plan.perplexity == plan.perplexity and \
        baseline.perplexity >= plan.perplexity
    return omega or ppl


def spreads_overlap(a: MethodResult, b: MethodResult) -> bool:
    """Whether the measured tokens/s spreads [min, max] of two methods overlap (a spread of one run is a point)."""
    lo_a, hi_a = _spread(a)
    lo_b, hi_b = _spread(b)
    return lo_a <= hi_b and lo_b <= hi_a


def _spread(r: MethodResult) -> tuple[float, float]:
    lo = r.measured_tok_s_min if r.measured_tok_s_min == r.measured_tok_s_min else r.measured_tok_s
    hi = r.measured_tok_s_max if r.measured_tok_s_max == r.measured_tok_s_max else r.measured_tok_s
    return lo, hi


def machine_loaded(results: list[MethodResult]) -> float | None:
    """The largest load factor of the runs where any says the machine was loaded, else None."""
    loaded = [r.load_factor for r in results if is_loaded(r.load_factor)]
    return max(loaded) if loaded else None


def ratio_vs_best_baseline(results: list[MethodResult]) -> dict[str, tuple[float, str]]:
    """For each measured non-baseline method: (its measured throughput over the fastest measured baseline of equal or
    worse quality (`comparable`), that baseline's name); (NaN, "") where none qualifies, and for baselines."""
    measured = [r for r in results if r.measured_tok_s == r.measured_tok_s]
    out: dict[str, tuple[float, str]] = {r.method: (math.nan, "") for r in results}
    for r in measured:
        if is_baseline(r.method):
            continue
        fair = [b for b in measured if is_baseline(b.method) and comparable(r, b)]
        if fair:
            best = max(fair, key=lambda b: (b.measured_tok_s, b.method))
            out[r.method] = (r.measured_tok_s / best.measured_tok_s, best.method)
    return out


def compare(results: list[MethodResult], plans: dict[str, dict]) -> dict[str, Comparison]:
    """Each method against the fastest baseline of equal or worse quality (module docstring): identical plans,
    overlapping spreads, a loaded machine. A baseline's row names only a plan identical to another method's; a
    method whose plan is a baseline's is reported identical to it, not ranked; llmpq configurations that share one
    plan (and no baseline's) are each ranked, with the names of the others."""
    ratios = ratio_vs_best_baseline(results)
    by_name = {r.method: r for r in results}
    fastest = max((r for r in results if is_baseline(r.method) and r.method in plans),
                  key=lambda r: r.measured_tok_s, default=None)
    loaded = machine_loaded(results)
    out = {}
    for r in results:
        ratio, base = ratios.get(r.method, (math.nan, ""))
        twins = [o.method for o in results if o.method != r.method and r.method in plans and o.method in plans
                 and same_plan(plans[r.method], plans[o.method])]
        for first in (base, fastest.method if fastest else ""):
            if first in twins:
                twins.remove(first)
                twins.insert(0, first)
                break
        noise = bool(base) and spreads_overlap(r, by_name[base])
        same = f"same plan as {', '.join(twins)}" if twins else ""
        if twins and (is_baseline(r.method) or any(is_baseline(t) for t in twins) or ratio != ratio):
            text = f"identical plan to {twins[0]}"   # a baseline's plan under another name: not ranked
        elif ratio != ratio:
            text = ""
        elif loaded is not None:
            text = f"withheld: machine loaded (x{loaded:.2f})" + (f"; {same}" if same else "")
        else:
            text = f"{ratio:.2f}x {base}" + (" (within noise)" if noise else "") + (f"; {same}" if same else "")
        out[r.method] = Comparison(ratio, base, noise, twins[0] if twins else "", text)
    return out


def timing_notes(exp, results: Path) -> list[str]:
    """A line for each profile or link table of the experiment's cluster that was timed on a busy machine (load
    average above the core count): its predictions carry that load."""
    from ..artifacts import read_meta

    found = [paths.profile_path(results, d, exp.model.name) for d in exp.cluster.device_stems()]
    found.append(paths.links_path(results, exp.cluster.name))
    notes = []
    for path in (p for p in found if p.is_file()):
        meta = read_meta(path)
        if busy_machine(meta):
            notes.append(f"{path} was timed with load average {float(meta['load_average']):.1f} on "
                         f"{float(meta['cores']):.0f} cores: its predictions carry that load.")
    return notes


def summary_markdown(title: str, results: list[MethodResult], comparisons: dict[str, Comparison],
                     notes: Sequence[str] = ()) -> str:
    """A short table a person reads at the end of a run (and `notes` on how it was timed)."""
    lines = [f"### {title}", "", "| method | measured tok/s | spread (runs) | predicted tok/s | prefill err | decode err | "
             "perplexity | Σω | vs best baseline (equal or worse quality) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.plan_status.startswith("infeasible"):
            lines.append(f"| {r.method} | {r.plan_status} | | | | | | | |")
            continue
        lo, hi = _spread(r)
        lines.append(f"| {r.method} | {r.measured_tok_s:.1f} | {lo:.0f}–{hi:.0f} ({r.repeats}) | {r.predicted_tok_s:.1f} | "
                     f"{r.prefill_rel_error:+.1%} | {r.decode_rel_error:+.1%} | {r.perplexity:.2f} | {r.omega:.3g} | "
                     f"{comparisons[r.method].text} |")
    loaded = machine_loaded(results)
    if loaded is not None:
        lines += ["", f"The machine was loaded while these plans ran: a run's idle reference timing took up to "
                      f"{loaded:.2f}x its profile's (threshold {LOADED_FACTOR:.2f}x), so the ranking is withheld; "
                      "rerun on a quiet machine."]
    if notes:
        lines += ["", *notes]
    jobs = [r for r in results if r.generate_tok_s == r.generate_tok_s]
    if jobs:
        lines += ["", "Batch job on the prompts file (llmpq generate):", "",
                  "| method | measured tok/s | predicted tok/s | error |", "|---|---:|---:|---:|"]
        lines += [f"| {r.method} | {r.generate_tok_s:.1f} | {r.generate_predicted_tok_s:.1f} | "
                  f"{r.generate_rel_error:+.1%} |" for r in jobs]
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
    plan_files = sorted(p for p in plan_dir.glob("*.json") if not p.name.endswith(".meta.json"))
    for plan_file in console_bar(plan_files, desc=f"evaluate {model} on {cluster}, {workload}", unit="methods",
                                 disable=True):
        method = plan_file.stem
        plan = json.loads(plan_file.read_text())
        if is_infeasible(plan):
            results.append(infeasible_result(method, plan))
            print(f"evaluated {method}: infeasible ({plan['infeasible']['kind']})", flush=True)
            continue
        run_file = paths.run_path(args.results, model, cluster, workload, method)
        if not run_file.is_file():
            continue
        plans[method] = plan
        ppl = _plan_perplexity(plan_file, weights, spec, token_ids, args.results, model, ppl_of)
        runs = read_table("runs", run_file)
        job = runs_path(paths.output_path(args.results, model, cluster, workload, method))
        results.append(with_generate(method_result(method, plan, runs, ppl), plan, job))
        stage_rows.extend(stage_memory_rows(method, plan, runs))
        print(f"evaluated {method}: {results[-1].measured_tok_s:.1f} tok/s measured, perplexity {ppl:.2f}", flush=True)
    if not plans:
        raise FileNotFoundError(f"{plan_dir}: no plan with a matching run to evaluate")
    comparisons = compare(results, plans)
    rows = [{**vars(r), "ratio_vs_best_baseline": c.ratio, "compared_with": c.compared_with,
             "within_noise": c.within_noise, "identical_to": c.identical_to, "comparison": c.text}
            for r, c in ((r, comparisons[r.method]) for r in results)]
    figures = figure_dir(Path(out))
    ran = [r for r in results if r.method in plans]
    plots.plot_plans(plans, figures / "plan.png")
    plots.plot_throughput([r.method for r in ran], [r.measured_tok_s for r in ran],
                          [r.predicted_tok_s for r in ran], figures / "throughput.png")
    plots.plot_quality([r.method for r in ran], [r.measured_tok_s for r in ran],
                       [r.perplexity for r in ran], figures / "quality.png")
    _fidelity_figure(exp, args.results, figures / "fidelity.png")
    text = summary_markdown(f"{model} on {cluster}, workload {workload}", results, comparisons,
                            timing_notes(exp, Path(args.results)))
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
    key = (plan_bits.bits, plan_bits.scheme, plan_bits.dtype)
    if key not in cache:
        cache[key] = model_perplexity(weights, spec, list(plan_bits.bits), paths.quant_root(results, model),
                                      plan_bits.scheme, token_ids=token_ids, dtype=plan_bits.dtype).perplexity
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
