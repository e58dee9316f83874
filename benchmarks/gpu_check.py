"""The GPU path, checked where a GPU is: one-stage deploys of tiny-opt on the GPU against HF `generate` and against
the plan's own memory and clocks.

On whatever CUDA GPU is present (its device config found by name and memory among `conf/device/`), for a one-stage
plan at 16 bits (fp16 kernel) and one with quantized layers on kernels of the device's menu that build quickly
(ExLlama at 4 bits, Triton at 8, where the device has them; Marlin's JIT build takes minutes): `llmpq deploy` runs it with the real launcher and stage process; the script records
whether the greedy tokens equal HF `generate` in fp16 on the same GPU (16-bit plan; the quantized plan's tokens
are recorded beside its match rate), compute + wait against each phase's wall time, the measured peak memory
against the plan's predicted total, and the wall time of each step. The kernel timings themselves are
`benchmarks/gpu_kernels.py`.

Keys: `gpu`, `device_stem`, `torch`, `plans: {name: {kernels, tokens_match_hf, token_match_rate,
phase_ms: {phase: {wall, compute, wait}}, clock_gap, measured_peak_bytes, predicted_bytes, memory_rel_error,
tok_s_measured, tok_s_predicted}}`, `errors`.

Run from the repository root with the package importable and tiny-opt built and quantized (`snakemake --cores 2`
on a CPU machine, then carry `results/models/tiny-opt` and `results/quantized/tiny-opt`):
`python benchmarks/gpu_check.py [--out PATH]`; writes `benchmarks/results/gpu_check_<gpu>.json`. On a machine
without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path("results")
MODEL = RESULTS / "models" / "tiny-opt"
B, S, N = 8, 64, 16


def gpu_stem(name: str, memory_gib: float) -> str | None:
    """The shipped device config whose nvidia-smi name (spaces as _) matches this GPU, nearest in memory."""
    import yaml

    want = name.replace(" ", "_").lower()
    found = []
    for path in sorted(Path("conf/device").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if data.get("kind", "gpu") == "gpu" and str(data.get("name", "")).lower() == want:
            found.append((abs(float(data.get("memory_gib", 0)) - memory_gib), path.stem))
    return min(found)[1] if found else None


QUICK_FIRST = ("exllama", "triton", "torch")  # kernels whose JIT builds take seconds (Marlin's takes minutes)


def quick_kernel(menu: tuple[str, ...]) -> str:
    """The device's kernel for a bit-width that builds fastest (the check is about the path, not the speed)."""
    return next((k for k in QUICK_FIRST if k in menu), menu[0])


def write_config_dir(root: Path, stem: str) -> Path:
    (root / "cluster").mkdir(parents=True, exist_ok=True)
    (root / "cluster" / "gpu-check.yaml").write_text(
        f"name: gpu-check\nnodes:\n  - {{name: n0, devices: {{{stem}: 1}}}}\npresent: true\n"
        "links:\n  intra_node: {bandwidth_gbps: 64, latency_us: 10}\n  inter_node: {bandwidth_gbps: 12.5, latency_us: 50}\n")
    return root


def one_stage_plan(path: Path, exp, stem: str, bits: tuple[int, ...], kernels: dict[int, str]) -> Path:
    from llmpq.solve.plan import Plan, StageMemoryPlan, StagePlan, to_json

    memory = StageMemoryPlan(1, 1, 1, 1, 1, 1, 0, 1 << 30)  # deploy computes the plan's memory itself
    stage = StagePlan(stem, "n0", 0, len(bits), bits, memory, 1.0, 1.0, tuple(sorted(kernels.items())))
    plan = Plan(method="gpu-check", model="tiny-opt", cluster="gpu-check", workload=exp.workload.name,
                quant_scheme="gptq", quant_group_size=128, micro_batch_prefill=4, micro_batch_decode=8,
                stages=(stage,), prefill_s=1.0, decode_s=1.0, throughput_tok_s=1.0, bottleneck_stage=0, omega=0.0,
                ppl_increase=None, budget=None, latency_source="roofline", omega_source="proxy", status="feasible",
                objective=None, gap=None, plan_source="baseline")
    path.write_text(to_json(plan))
    return path


def hf_tokens(prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float16).cuda().eval()
    ids = torch.tensor(prompts, device="cuda")
    config = model.generation_config
    config.update(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[:, ids.shape[1]:].tolist()


def predicted_bytes(exp, plan_path: Path) -> int:
    """The stage's planned bytes by the one memory accounting (what deploy checks), less the device's reserve (the
    CUDA context and allocator slack, which the allocator's peak does not see)."""
    from llmpq.models.source import model_shape
    from llmpq.runtime.launch import stage_specs
    from llmpq.solve.plan import read_plan

    spec = stage_specs(exp, read_plan(plan_path), model_shape(exp.model))[0]
    return spec.planned_total_bytes - exp.devices[spec.device].reserve_bytes


def check_plan(exp, plan_path: Path, out: Path) -> dict:
    from llmpq.artifacts import read_table
    from llmpq.runtime.launch import DeployOptions, deploy

    started = time.monotonic()
    run = deploy(exp, plan_path, out, DeployOptions(timeout_s=120), RESULTS)
    rows = read_table("runs", out).to_pylist()
    phases = {r["phase"]: {"wall": r["wall_ms"], "compute": r["compute_ms"], "wait": r["wait_ms"]} for r in rows}
    gap = max(abs(p["compute"] + p["wait"] - p["wall"]) / p["wall"] for p in phases.values() if p["wall"] > 0)
    hf = hf_tokens(run.sidecar["prompts"], N)
    same = sum(a == b for a, b in zip(run.sidecar["tokens"], hf))
    measured = max(r["peak_memory_bytes"] for r in rows)
    plan = json.loads(plan_path.read_text())
    predicted = predicted_bytes(exp, plan_path)
    wall_s = sum(p["wall"] for p in phases.values()) / 1e3
    return {"kernels": plan["stages"][0].get("kernels"), "bits": plan["stages"][0]["bits"],
            "tokens_match_hf": same == len(hf), "token_match_rate": same / len(hf), "phase_ms": phases,
            "clock_gap": gap, "measured_peak_bytes": measured, "predicted_bytes": predicted,
            "memory_rel_error": (measured - predicted) / predicted if predicted else None,
            "tok_s_measured": B * N / wall_s if wall_s else None, "check_s": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to check", file=sys.stderr)
        return 0
    from llmpq.config import compose_experiment
    from llmpq.costmodel.kernels import kernel_menu
    from llmpq.models.source import model_shape

    name = torch.cuda.get_device_name(0)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    short = re.sub(r"[^a-z0-9]+", "", name.lower().replace("nvidia", "").split()[0]) or "gpu"
    out = args.out or Path(f"benchmarks/results/gpu_check_{short}.json")
    result: dict = {"gpu": name, "memory_gib": memory_gib, "torch": torch.__version__, "plans": {}, "errors": {}}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")

    stem = gpu_stem(name, memory_gib)
    result["device_stem"] = stem
    if stem is None:
        result["errors"]["device"] = f"no conf/device config named {name.replace(' ', '_')!r}"
        save()
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exp = compose_experiment([f"model.source={MODEL}", "cluster=gpu-check", "workload=s64-n16-b8"],
                                 config_dir=write_config_dir(tmp / "conf", stem))
        device = exp.devices[stem]
        menu = kernel_menu(exp.kernels, device, exp.model.quant, model_shape(exp.model))
        low = {b: quick_kernel(menu[b]) for b in (8, 4) if menu.get(b)}
        plans = {"fp16": ((16, 16, 16, 16), {16: "fp16"}),
                 "mixed": ((16, 8, 4, 4), {16: "fp16", **low})}
        for label, (bits, kernels) in plans.items():
            try:
                path = one_stage_plan(tmp / f"{label}.json", exp, stem, bits, kernels)
                result["plans"][label] = check_plan(exp, path, tmp / f"{label}.parquet")
                print(f"gpu_check {label}: {json.dumps(result['plans'][label], default=str)}", flush=True)
            except Exception as exc:  # record and go on: the other plan may still run
                result["errors"][label] = f"{type(exc).__name__}: {str(exc)[:600]}"
            save()
    ok = [k for k, v in result["plans"].items() if v.get("tokens_match_hf")]
    print(f"gpu_check: {name} as {stem}: {len(result['plans'])} plan(s) deployed, tokens equal to HF for "
          f"{', '.join(ok) or 'none'}; {len(result['errors'])} error(s) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
