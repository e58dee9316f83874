"""Runtime: the solved plan's measured time against its prediction on the local CPU cluster, and the runtime's
speed against HF `generate`.

- `prefill_rel_error`, `decode_rel_error`: (measured − predicted) / predicted of the pipeline's phase wall
  times (median over `--deploys` deploys of `--repeats` runs each, the medians of each deploy's runs) for the
  default experiment's two-stage plan (tiny-opt, local-cpu, s64-n16-b8; the first of llmpq, uniform-best,
  pipeedge, uniform, adabits whose plan has two stages: `headline_plan`), one process per stage; every method's
  plan under `by_method` (per-stage compute and wait times, the replay with measured compute). Deploys of all
  the plans alternate, so load from other processes falls on them alike.
- `memory_rel_error`: per stage of the headline plan, (measured peak − predicted) / predicted, the stage's RSS
  growth against the memory model's total for the stage (`stage_memory`, the device reserve aside).
- `load_factor`: the largest of the runs' idle reference timings over their profiles' (`llmpq.profile.load`);
  `loaded` when it passes the threshold: the timings were taken on a loaded machine.
- `overheads`: the cost model's per-step terms from the profiles (after-idle cost per layer, loop cost per step) and
  the link fits (idle and busy) that the prediction used.
- `speedup_vs_hf_generate`: tokens/s of a one-stage 16-bit plan (the first device with its memory cap lifted to
  1 GiB, its threads, b_p = b_d = B) over HF `generate` (greedy, the same prompts, n tokens, no EOS stop, the same threads); both medians.
  The one-stage plan's own prediction errors are under `one_stage` (no pipeline, no messages).

Inputs come from the workflow's results directory; whatever is missing (plan, quantized stores) is built
first with `snakemake`. Run from the repository root: `python benchmarks/runtime.py` (about a minute
when the inputs exist); writes `benchmarks/results/runtime.json` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmpq import paths
from llmpq.config import Experiment, compose_experiment
from llmpq.costmodel.context import build_context
from llmpq.costmodel.estimate import StageAssignment, estimate
from llmpq.costmodel.pipeline import PhaseTimes, decode_ms, micro_batches, prefill_ms
from llmpq.models.source import model_dir
from llmpq.profile.load import is_loaded
from llmpq.runtime.launch import DeployOptions, DeployResult, deploy
from llmpq.solve.plan import Plan, StageMemoryPlan, StagePlan, read_plan, to_json

OUT = Path("benchmarks/results/runtime.json")


def ensure_inputs(exp: Experiment, results: Path, plan_path: Path) -> None:
    """Build the plan and the model's quantized stores with snakemake where they are missing."""
    stores = [paths.quant_manifest_path(results, exp.model.name, exp.model.quant.scheme, b) for b in exp.model.bits]
    missing = [str(p) for p in (plan_path, *stores) if not p.is_file()]
    if missing:
        print(f"building {len(missing)} missing input(s) with snakemake ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", *missing], check=True)


def rel_error(measured: float, predicted: float) -> float:
    return (measured - predicted) / predicted


def phase_medians(runs: list[DeployResult]) -> dict[str, float]:
    return {phase: statistics.median(next(r["wall_ms"] for r in run.rows if r["phase"] == phase) for run in runs)
            for phase in ("prefill", "decode")}


def stage_table(runs: list[DeployResult]) -> list[dict]:
    """Per stage and phase: medians of compute and wait time beside the predicted compute time."""
    out = []
    for i, row in enumerate(runs[0].rows):
        pick = [run.rows[i] for run in runs]
        out.append({"stage": row["stage"], "device": row["device"], "phase": row["phase"], "steps": row["steps"],
                    "compute_ms": statistics.median(r["compute_ms"] for r in pick),
                    "predicted_compute_ms": row["predicted_compute_ms"],
                    "wait_ms": statistics.median(r["wait_ms"] for r in pick),
                    "compute_rel_error": rel_error(statistics.median(r["compute_ms"] for r in pick),
                                                   row["predicted_compute_ms"])})
    return out


def memory_errors(runs: list[DeployResult], exp: Experiment) -> list[dict]:
    """Per stage: the measured peak (RSS growth on a CPU) against the planned total less the device's reserve."""
    out = []
    for row in (r for r in runs[0].rows if r["phase"] == "prefill"):
        measured = statistics.median(next(r["peak_memory_bytes"] for r in run.rows
                                          if r["stage"] == row["stage"] and r["phase"] == "prefill") for run in runs)
        predicted = row["planned_memory_bytes"] - exp.devices[row["device"]].reserve_bytes
        out.append({"stage": row["stage"], "device": row["device"], "measured_peak_bytes": int(measured),
                    "predicted_bytes": int(predicted), "memory_rel_error": rel_error(measured, predicted)})
    return out


def overheads(exp: Experiment, results: Path) -> dict:
    """The per-step terms and link fits the cost model used (from the profiles): idle fits are the links' own times,
    busy fits each sending stage's cost per message."""
    from llmpq.costmodel.context import read_links

    ctx = build_context(exp, results)
    devices = {stem: {"source": ctx.latency.overhead_source(stem),
                      "after_idle_ms": {p: ctx.latency.after_idle_ms(stem, p) for p in ("prefill", "decode")},
                      "loop_ms_b1": {p: ctx.latency.loop_ms(stem, p, 1) for p in ("prefill", "decode")}}
               for stem in exp.cluster.device_stems()}
    links_file = paths.links_path(results, exp.cluster.name)
    links = {load: {k: vars(v) for k, v in read_links(links_file, load, fallback=False).items()}
             for load in ("idle", "busy")} \
        if links_file.is_file() else {}
    return {"devices": devices, "links": links}


def replay(exp: Experiment, results: Path, plan: Plan, runs: list[DeployResult]) -> dict[str, float]:
    """The pipeline formulas with each stage's measured mean compute per step and the predicted link times (ms):
    what the plan would predict with a perfect compute model, to separate compute error from the rest."""
    ctx = build_context(exp, results)
    stages = [StageAssignment(s.device, s.node, s.start, s.end, s.bits) for s in plan.stages]
    est = estimate(ctx, stages, plan.micro_batch_prefill, plan.micro_batch_decode)
    table = stage_table(runs)
    per_step = {ph: tuple(r["compute_ms"] / r["steps"] for r in table if r["phase"] == ph)
                for ph in ("prefill", "decode")}
    w = exp.workload
    k_p, k_d = micro_batches(w.batch, plan.micro_batch_prefill), micro_batches(w.batch, plan.micro_batch_decode)
    decode = PhaseTimes(per_step["decode"], est.comm_decode_ms)
    return {"prefill": prefill_ms(PhaseTimes(per_step["prefill"], est.comm_prefill_ms), k_p),
            "decode": decode_ms([decode] * (w.gen_len - 1), k_d),
            "comm_prefill_ms": list(est.comm_prefill_ms), "comm_decode_ms": list(est.comm_decode_ms)}


def one_stage_plan(exp: Experiment, results: Path, device: str) -> Plan:
    """All layers at 16 bits on `device`, b_p = b_d = B, with the cost model's prediction."""
    ctx = build_context(exp, results)
    node = next(node for node, stem in exp.cluster.device_slots() if stem == device)
    layers = ctx.shape.num_layers
    batch = exp.workload.batch
    est = estimate(ctx, [StageAssignment(device, node, 0, layers, (16,) * layers)], batch, batch)
    m = est.memory[0]
    memory = StageMemoryPlan(m.weights_bytes, m.kv_bytes, m.activations_bytes, m.embed_bytes, m.head_bytes,
                             m.buffers_bytes, m.reserve_bytes, m.capacity_bytes)
    stage = StagePlan(device, node, 0, layers, (16,) * layers, memory, est.stage_prefill_ms[0], est.stage_decode_ms[0])
    return Plan(method="one-stage-fp", model=exp.model.name, cluster=exp.cluster.name, workload=exp.workload.name,
                quant_scheme=exp.model.quant.scheme, quant_group_size=exp.model.quant.group_size,
                micro_batch_prefill=batch, micro_batch_decode=batch, stages=(stage,), prefill_s=est.prefill_s,
                decode_s=est.decode_s, throughput_tok_s=est.throughput_tok_s, bottleneck_stage=0, omega=0.0,
                ppl_increase=None, budget=None, latency_source="profile", omega_source="proxy", status="feasible",
                objective=None, gap=None, plan_source="baseline")


def hf_generate(model_dir: Path, prompts: list[list[int]], gen_len: int, threads: int,
                repeats: int) -> tuple[float, list[list[int]]]:
    """Median tokens/s of HF greedy `generate` on the prompts (n new tokens each, no EOS stop) after a warm-up,
    and the generated ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    config = model.generation_config
    config.update(max_new_tokens=gen_len, do_sample=False, eos_token_id=None, pad_token_id=1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = []
    try:
        with torch.inference_mode():
            for r in range(repeats + 1):
                start = time.perf_counter()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
                if r:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return len(prompts) * gen_len / statistics.median(times), out[:, ids.shape[1]:].tolist()


METHODS = ("llmpq", "uniform-best", "pipeedge", "uniform", "adabits")


def roomy_config(root: Path, device: str) -> Path:
    """A config dir whose `device` is the shipped one with a 1 GiB memory cap (the one-stage 16-bit comparison with
    HF generate does not fit the default cluster's caps; the device stem, hence its profile, stays the same)."""
    import yaml

    data = yaml.safe_load(Path(f"conf/device/{device}.yaml").read_text())
    data.update(memory_gib=1.0, memory_cap_gib=1.0)
    (root / "device").mkdir(parents=True, exist_ok=True)
    (root / "device" / f"{device}.yaml").write_text(yaml.safe_dump(data))
    return root


def plan_record(exp: Experiment, results: Path, plan_path: Path, plan: Plan, runs: list[DeployResult]) -> dict:
    """One plan's measured phases against its prediction, per stage figures and memory."""
    measured = phase_medians(runs)
    return {
        "path": str(Path(results.name) / plan_path.relative_to(results)),  # no path of the machine that ran it
        "method": plan.method, "latency_source": plan.latency_source,
        "stages": [{"device": s.device, "layers": [s.start, s.end], "bits": list(s.bits)} for s in plan.stages],
        "micro_batch": {"prefill": plan.micro_batch_prefill, "decode": plan.micro_batch_decode},
        "prefill_rel_error": rel_error(measured["prefill"], plan.prefill_s * 1e3),
        "decode_rel_error": rel_error(measured["decode"], plan.decode_s * 1e3),
        "measured_ms": measured, "predicted_ms": {"prefill": plan.prefill_s * 1e3, "decode": plan.decode_s * 1e3},
        "measured_tok_s": statistics.median(run.rows[0]["throughput_tok_s"] for run in runs),
        "predicted_tok_s": plan.throughput_tok_s,
        "memory_rel_error": memory_errors(runs, exp),
        "load_factor": max((r["load_factor"] for run in runs for r in run.rows if r["load_factor"] == r["load_factor"]),
                           default=float("nan")),
        "stages_measured": stage_table(runs),
        "with_measured_compute_ms": replay(exp, results, plan, runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--deploys", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    exp = compose_experiment([])
    results = args.results
    plan_paths = {m: paths.plan_path(results, exp.model.name, exp.cluster.name, exp.workload.name, m)
                  for m in METHODS}
    for path in plan_paths.values():
        ensure_inputs(exp, results, path)
    plans = {m: read_plan(p) for m, p in plan_paths.items()}
    device = exp.cluster.device_stems()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        roomy = compose_experiment([], config_dir=roomy_config(work / "conf", device))
        single = one_stage_plan(roomy, results, device)
        (work / "one-stage.json").write_text(to_json(single))
        runs: dict[str, list[DeployResult]] = {m: [] for m in (*METHODS, "one-stage")}
        for d in range(args.deploys):  # methods alternate, so load from other processes falls on all alike
            for m in METHODS:
                runs[m].append(deploy(exp, plan_paths[m], work / f"{m}-{d}.parquet",
                                      DeployOptions(seed=0, repeats=args.repeats), results))
            runs["one-stage"].append(deploy(roomy, work / "one-stage.json", work / f"one-stage-{d}.parquet",
                                            DeployOptions(seed=0, repeats=args.repeats), results))
    by_method = {m: plan_record(exp, results, plan_paths[m], plans[m], runs[m]) for m in METHODS}
    two = next((m for m in METHODS if len(plans[m].stages) == 2), None)
    single_runs = runs["one-stage"]
    single_measured = phase_medians(single_runs)
    load = max((r["load_factor"] for m in runs for run in runs[m] for r in run.rows
                if r["load_factor"] == r["load_factor"]), default=float("nan"))
    runtime_tok_s = statistics.median(run.rows[0]["throughput_tok_s"] for run in single_runs)
    threads = exp.devices[device].threads or 1
    hf_tok_s, hf_tokens = hf_generate(model_dir(exp.model), single_runs[0].sidecar["prompts"], exp.workload.gen_len,
                                      threads, args.deploys * args.repeats)
    if hf_tokens != single_runs[0].sidecar["tokens"]:
        raise RuntimeError("the one-stage 16-bit plan and HF generate produced different tokens")
    head = by_method[two] if two else by_method["llmpq"]
    record = {
        "prefill_rel_error": head["prefill_rel_error"], "decode_rel_error": head["decode_rel_error"],
        "memory_rel_error": head["memory_rel_error"],
        "headline_plan": two or "llmpq",
        "speedup_vs_hf_generate": runtime_tok_s / hf_tok_s,
        "load_factor": load, "loaded": is_loaded(load),
        "by_method": by_method,
        "overheads": overheads(exp, results),
        "one_stage": {"device": device, "measured_ms": single_measured,
                      "predicted_ms": {"prefill": single.prefill_s * 1e3, "decode": single.decode_s * 1e3},
                      "prefill_rel_error": rel_error(single_measured["prefill"], single.prefill_s * 1e3),
                      "decode_rel_error": rel_error(single_measured["decode"], single.decode_s * 1e3),
                      "stages": stage_table(single_runs), "tok_s": runtime_tok_s, "hf_generate_tok_s": hf_tok_s},
        "workload": {"batch": exp.workload.batch, "prompt_len": exp.workload.prompt_len,
                     "gen_len": exp.workload.gen_len},
        "deploys": args.deploys, "repeats": args.repeats, "threads": threads, "host_cores": os.cpu_count(),
        "load_average_after": os.getloadavg()[0], "python": platform.python_version(), "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    errors = ", ".join(f"{m} ({len(plans[m].stages)} st.) {100 * r['prefill_rel_error']:+.0f}%/"
                       f"{100 * r['decode_rel_error']:+.0f}%" for m, r in by_method.items())
    print(f"runtime: prefill/decode error vs prediction: {errors}; headline {record['headline_plan']}; memory "
          + ", ".join(f"{100 * m['memory_rel_error']:+.0f}%" for m in record["memory_rel_error"])
          + f"; one stage {runtime_tok_s:.0f} tok/s vs HF generate {hf_tok_s:.0f} tok/s "
          f"(x{record['speedup_vs_hf_generate']:.2f}); load factor {load:.2f}"
          f"{' (LOADED: timings not trustworthy)' if is_loaded(load) else ''} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
