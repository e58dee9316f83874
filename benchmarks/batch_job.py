"""Batch job: N prompts of mixed lengths through the default two-stage plan with `llmpq generate`.

- `tokens_per_s`, `prompts_per_s`, `wall_s`: generated tokens (end-of-sequence tokens included) and prompts
  over the job's wall time on the first stage (from its first step to its last completion written, fsyncs
  included; process start and model loading excluded), continuous mode (finished sequences leave their
  micro-batch, free slots are refilled); the median of `--repeats` runs.
- `tokens_per_s_static`: the same job with compaction and refill off (waves of B; every row of a decode
  micro-batch runs until its last one has finished), so the gain of stopping at EOS is visible.
- `predicted_tokens_per_s`: the plan's prediction for the file's planning shape (B prompts in flight, s = the
  mean prompt, n = max_new_tokens for every prompt); `rel_error` = (measured − predicted) / predicted of the
  continuous run. The prediction assumes every sequence runs to n: where sequences stop early, measured
  tokens/s falls below it by design (fewer tokens per sequence, the same per-sequence prefill), so the job is
  also run with `stop: none` (`tokens_per_s_no_eos`, `rel_error_no_eos`: what the prediction describes).
- `steps`, `compute_s` per mode: steps through the pipeline and compute time summed over the stages (medians):
  under load from other processes these vary less than wall time.

The prompts: N windows of 8–120 tokens cut from the held-out play (seeded), as a JSONL prompts file. The
model: tiny-opt with a line break added to its end-of-sequence ids, because tiny-opt never learned to
emit `</s>` (it was trained on plain text); an instruct model ends its turn the same way, after a varying
number of tokens. The plan: `llmpq solve` (the configured solver, default llmpq) on local-cpu for this
file, from the workflow's profiles, quantized stores and sensitivity (built with snakemake where missing).
Run from the repository root: `python benchmarks/batch_job.py`; writes `benchmarks/results/batch_job.json`
and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from llmpq import paths
from llmpq.cli import main as llmpq_main
from llmpq.config import compose_experiment
from llmpq.data.text import encode_split
from llmpq.generate.outputs import load_output
from llmpq.generate.run import GenerateOptions, generate
from llmpq.solve.plan import read_plan

OUT = Path("benchmarks/results/batch_job.json")
NEWLINE = "\n"


def ensure_inputs(results: Path, cluster_devices: list[str], bits: list[int]) -> None:
    """Profiles, quantized stores, sensitivity and ppl_map of tiny-opt, built with snakemake where missing."""
    wanted = [paths.profile_path(results, d, "tiny-opt") for d in cluster_devices]
    wanted += [paths.quant_manifest_path(results, "tiny-opt", "gptq", b) for b in bits]
    wanted += [paths.sensitivity_path(results, "tiny-opt"), paths.ppl_map_path(results, "tiny-opt")]
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        print(f"building {len(missing)} missing input(s) with snakemake ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", *missing], check=True)


def eos_model(source: Path, out: Path) -> tuple[Path, list[int]]:
    """A copy of the model whose end-of-sequence ids include the line-break token."""
    from transformers import AutoTokenizer

    shutil.copytree(source, out)
    newline = AutoTokenizer.from_pretrained(str(out))(NEWLINE, add_special_tokens=False)["input_ids"]
    if len(newline) != 1:
        raise RuntimeError(f"the tokenizer splits a line break into {newline}")
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    eos = sorted({int(gen["eos_token_id"]), newline[0]})
    gen_path.write_text(json.dumps({**gen, "eos_token_id": eos}))
    return out, eos


def write_prompts(model: Path, path: Path, count: int, seed: int) -> list[int]:
    """`count` prompts of 8–120 tokens cut from the held-out play; their lengths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    ids = encode_split("shakespeare", "eval", tok)
    rng = random.Random(seed)
    lines, lengths = [], []
    while len(lines) < count:
        n = rng.randint(8, 120)
        start = rng.randrange(len(ids) - n)
        text = tok.decode(ids[start:start + n])
        if tok(text)["input_ids"] != ids[start:start + n]:
            continue
        lines.append(json.dumps({"id": f"b{len(lines):04d}", "prompt": text}) + "\n")
        lengths.append(n)
    path.write_text("".join(lines))
    return lengths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--solver", default="llmpq")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)  # B = 8 at 152 tokens no longer fits local-cpu's caps
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    base = compose_experiment([f"solver={args.solver}"])
    ensure_inputs(args.results, base.cluster.device_stems(), list(base.model.bits))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, eos = eos_model(paths.tiny_model_dir(args.results), work / "tiny-opt")
        prompts = work / "prompts.jsonl"
        lengths = write_prompts(model, prompts, args.prompts, args.seed)
        overrides = [f"model.source={model}", f"solver={args.solver}", "workload=example-prompts",
                     "workload.name=batch-job-bench",  # one name for the plan and both runs (stop=none below)
                     f"workload.prompts={prompts}", f"workload.max_new_tokens={args.max_new_tokens}",
                     f"workload.batch={args.batch}"]
        plan_path = work / "plan.json"
        if llmpq_main(["solve", *overrides, f"results={args.results}", f"out={plan_path}"]) != 0:
            raise RuntimeError("llmpq solve failed")
        plan = read_plan(plan_path)
        exp = compose_experiment(overrides)
        exp_no_eos = compose_experiment(overrides + ["workload.stop=none"])
        rows: dict[str, list[dict]] = {"continuous": [], "static": [], "no_eos": []}
        completions = None
        for r in range(args.repeats):
            for mode in rows:
                out = work / f"{mode}-{r}.jsonl"
                options = GenerateOptions(mode="continuous" if mode == "no_eos" else mode, progress=False)
                result = generate(exp_no_eos if mode == "no_eos" else exp, plan_path, out, None, options, args.results)
                rows[mode].append(result.row)
                if mode == "no_eos":
                    continue
                lines = [(x["id"], x["completion"]) for x in load_output(out)]
                completions = completions or lines
                same = sum(a == b for a, b in zip(lines, completions))
                if same < 0.95 * len(lines):
                    raise RuntimeError(f"{mode} run {r}: only {same} of {len(lines)} completions agree")
    best = {mode: statistics.median(x["tokens_per_s"] for x in runs) for mode, runs in rows.items()}
    cont = sorted(rows["continuous"], key=lambda x: x["tokens_per_s"])[len(rows["continuous"]) // 2]
    predicted = plan.throughput_tok_s
    record = {
        "tokens_per_s": best["continuous"],
        "prompts_per_s": cont["prompts_per_s"],
        "wall_s": cont["wall_s"],
        "predicted_tokens_per_s": predicted,
        "rel_error": (best["continuous"] - predicted) / predicted,
        "tokens_per_s_static": best["static"],
        "prompts_per_s_static": statistics.median(x["prompts_per_s"] for x in rows["static"]),
        "wall_s_static": statistics.median(x["wall_s"] for x in rows["static"]),
        "speedup_continuous_vs_static": best["continuous"] / best["static"],
        "tokens_per_s_no_eos": best["no_eos"],
        "rel_error_no_eos": (best["no_eos"] - predicted) / predicted,
        "steps": {m: statistics.median(x["steps"] for x in runs) for m, runs in rows.items()},
        "compute_s": {m: statistics.median(x["compute_s"] for x in runs) for m, runs in rows.items()},
        "generated_tokens": cont["generated_tokens"],
        "eos_stops": cont["eos_stops"],
        "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "batch": args.batch, "eos_ids": eos,
        "prompt_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
        "plan": {"method": plan.method, "latency_source": plan.latency_source,
                 "stages": [{"device": s.device, "layers": [s.start, s.end], "bits": list(s.bits)}
                            for s in plan.stages],
                 "micro_batch": {"prefill": plan.micro_batch_prefill, "decode": plan.micro_batch_decode},
                 "planning_len": plan.prompts.stats.planning_len if plan.prompts else None},
        "runs": rows, "repeats": args.repeats,
        "load_average_after": round(os.getloadavg()[0], 2),  # 1-minute load: above the core count, a loaded run
        "host_cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"batch_job: {args.prompts} prompts, {len(plan.stages)}-stage {plan.method} plan: "
          f"{record['tokens_per_s']:.0f} tok/s, {record['prompts_per_s']:.1f} prompts/s in {record['wall_s']:.2f} s "
          f"(predicted {predicted:.0f} tok/s, {record['rel_error']:+.0%}; without EOS {record['tokens_per_s_no_eos']:.0f} "
          f"tok/s, {record['rel_error_no_eos']:+.0%}); static {record['tokens_per_s_static']:.0f} "
          f"tok/s (x{record['speedup_continuous_vs_static']:.2f} continuous) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
