"""The GPU path, checked where a GPU is, in one call within a time budget (default 7.5 minutes on one GPU).

On whatever CUDA GPU is present (its device config found by name pattern and memory among `conf/device/`,
`llmpq.config.identity`), in this order, each part skipped with a reason once the budget is spent:

1. `tiny_profile`: `llmpq profile` of tiny-opt on the GPU at 16 bits on a small grid, with the per-step overheads
   and the idle reference (written to `results/profiles/<stem>/tiny-opt.parquet`, so the deploys below are
   predicted from it and their load factor is known).
2. `plans`: one-stage deploys of tiny-opt with the real launcher and stage process: 16 bits in float16, 16 bits in
   the dtype `auto` gives the model on this GPU, and a mixed plan on quantized kernels that build quickly
   (ExLlama at 4 bits, Triton at 8). For each: greedy tokens against HF `generate` in the same dtype, compute +
   wait against the stage's phase wall (`clock_gap`), the CUDA allocator's measured peak against the memory
   model (`memory_rel_error`, the device reserve aside), the decode wall of each repetition (a warm-up that
   misses a shape shows as a slow first repetition), measured against predicted phase times, the load factor.
3. `layers`: `llmpq profile`'s layer timing of one OPT-30B layer and one Llama-3-70B-shaped layer (GQA, gated MLP)
   at every bit-width and kernel of the device's menu, prefill and decode at b = 1 and 16 (s = c = 512; decode
   over 1024 keys), beside the kernel model's roofline for the same point. Kernels in build-time order: fp16,
   torch, triton, exllama, then Marlin last (its JIT build takes about 3 minutes on an H100), only if
   `--marlin-s` seconds of budget remain.
4. `ring`: the two-stage plan across two GPUs, where two are visible.

Writes `benchmarks/results/gpu_check_<gpu>.json` after every part (keys `gpu`, `device_stem`, `torch`, `parts`,
`errors`, `skipped`, `elapsed_s`). Run from the repository root with the package importable and tiny-opt built and
quantized at 16, 8 and 4 bits (`snakemake --cores 2` on a CPU machine, then carry `results/models/tiny-opt` and
`results/quantized/tiny-opt`): `python benchmarks/gpu_check.py [--out PATH] [--budget-s S]`. On a machine without
a GPU it says so and exits 0.
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
QUICK_FIRST = ("exllama", "triton", "torch")  # kernels whose JIT builds take seconds (Marlin's takes minutes)
KERNEL_ORDER = ("fp16", "torch", "triton", "exllama", "marlin")
LLAMA_70B_LAYER = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 1,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}


def quick_kernel(menu: tuple[str, ...]) -> str:
    """The device's kernel for a bit-width that builds fastest (the check is about the path, not the speed)."""
    return next((k for k in QUICK_FIRST if k in menu), menu[0])


def write_config_dir(root: Path, stem: str, count: int = 1) -> Path:
    (root / "cluster").mkdir(parents=True, exist_ok=True)
    (root / "cluster" / "gpu-check.yaml").write_text(
        f"name: gpu-check\nnodes:\n  - {{name: n0, devices: {{{stem}: {count}}}}}\npresent: true\n"
        "links:\n  intra_node: {bandwidth_gbps: 64, latency_us: 10}\n  inter_node: {bandwidth_gbps: 12.5, latency_us: 50}\n")
    return root


def predicted_plan(path: Path, exp, stem: str, bounds: list[tuple[int, int]], bits: tuple[int, ...],
                   kernels: dict[int, str], dtype: str) -> Path:
    """A plan of the given stages with the cost model's own prediction and memory (from the profile if written)."""
    from llmpq.costmodel.context import build_context
    from llmpq.costmodel.estimate import StageAssignment, estimate
    from llmpq.solve.plan import Plan, StagePlan, to_json

    ctx = build_context(exp, RESULTS)
    stages = [StageAssignment(stem, "n0", a, b, bits[a:b], tuple((x, kernels[x]) for x in set(bits[a:b])))
              for a, b in bounds]
    b_p, b_d = 4, B
    est = estimate(ctx, stages, b_p, b_d)
    plan_stages = tuple(StagePlan(s.device, s.node, s.start, s.end, s.bits, m, est.stage_prefill_ms[j],
                                  est.stage_decode_ms[j], s.kernels)
                        for j, (s, m) in enumerate(zip(est.stages, est.memory)))
    plan = Plan(method="gpu-check", model="tiny-opt", cluster="gpu-check", workload=exp.workload.name,
                quant_scheme="gptq", quant_group_size=128, micro_batch_prefill=b_p, micro_batch_decode=b_d,
                stages=plan_stages, prefill_s=est.prefill_s, decode_s=est.decode_s,
                throughput_tok_s=est.throughput_tok_s, bottleneck_stage=est.bottleneck_stage, omega=0.0,
                ppl_increase=None, budget=None, latency_source=ctx.latency.source(stem), omega_source="proxy",
                status="feasible", objective=None, gap=None, plan_source="baseline", dtype=dtype)
    path.write_text(to_json(plan))
    return path


def hf_tokens(prompts: list[list[int]], n: int, dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=dtype).cuda().eval()
    ids = torch.tensor(prompts, device="cuda")
    config = model.generation_config
    config.update(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[:, ids.shape[1]:].tolist()


def check_plan(exp, plan_path: Path, out: Path, dtype: str) -> dict:
    """Deploy a plan and compare it with HF generate, its clocks, its memory and its prediction."""
    from llmpq.runtime.launch import DeployOptions, deploy
    from llmpq.solve.plan import read_plan

    started = time.monotonic()
    run = deploy(exp, plan_path, out, DeployOptions(timeout_s=120, repeats=3), RESULTS)
    plan = read_plan(plan_path)
    hf = hf_tokens(run.sidecar["prompts"], N, getattr(torch, dtype))
    same = sum(a == b for a, b in zip(run.sidecar["tokens"], hf))
    rows = run.rows
    stages = []
    for row in rows:
        reserve = exp.devices[row["device"]].reserve_bytes
        predicted = row["planned_memory_bytes"] - reserve
        stages.append({
            "stage": row["stage"], "phase": row["phase"], "wall_ms": row["wall_ms"], "predicted_ms": row["predicted_ms"],
            "wall_ms_min": row["wall_ms_min"], "wall_ms_max": row["wall_ms_max"],
            "compute_ms": row["compute_ms"], "predicted_compute_ms": row["predicted_compute_ms"],
            "wait_ms": row["wait_ms"], "stage_wall_ms": row["stage_wall_ms"],
            "clock_gap": abs(row["compute_ms"] + row["wait_ms"] - row["stage_wall_ms"]) / row["stage_wall_ms"],
            "measured_peak_bytes": row["peak_memory_bytes"], "device_used_bytes": row["device_used_bytes"],
            "predicted_bytes": predicted, "memory_rel_error": (row["peak_memory_bytes"] - predicted) / predicted,
            "load_factor": row["load_factor"]})
    walls = {p: next(r["wall_ms"] for r in rows if r["phase"] == p) for p in ("prefill", "decode")}
    return {"dtype": dtype, "bits": [list(s.bits) for s in plan.stages],
            "kernels": [dict(s.kernels) for s in plan.stages],
            # HF's reference is the unquantized model: only a plan without quantized layers must match it
            "tokens_match_hf": same == len(hf) if all(b >= 16 for b in plan.bits) else None,
            "token_match_rate": same / len(hf),
            "prefill_rel_error": (walls["prefill"] - plan.prefill_s * 1e3) / (plan.prefill_s * 1e3),
            "decode_rel_error": (walls["decode"] - plan.decode_s * 1e3) / (plan.decode_s * 1e3),
            "latency_source": plan.latency_source, "clock_gap": max(s["clock_gap"] for s in stages),
            "memory_rel_error": max((s["memory_rel_error"] for s in stages), key=abs), "stages": stages,
            "tok_s_measured": rows[0]["throughput_tok_s"], "tok_s_predicted": plan.throughput_tok_s,
            "check_s": time.monotonic() - started}


def profile_tiny(exp, stem: str) -> dict:
    """tiny-opt profiled on this GPU at 16 bits (small grid, overheads, reference) into the results directory."""
    from llmpq import paths
    from llmpq.artifacts import read_meta
    from llmpq.costmodel.context import build_context
    from llmpq.models.source import hf_config_dict
    from llmpq.profile.run import ProfileGrid, profile_to

    grid = ProfileGrid(batches=(1, 4, 8), prompt_lens=(16, 64), contexts=(16, 64, 128), warmup=3, repeats=5,
                       min_time_ms=20, max_repeats=20)
    started = time.monotonic()
    out = profile_to(paths.profile_path(RESULTS, stem, "tiny-opt"), hf_config_dict(exp.model), "tiny-opt",
                     exp.devices[stem], exp.model.quant, grid, bits=(16,), progress=False, kernels=exp.kernels,
                     dtype=exp.model.dtype)
    meta = read_meta(out)
    lat = build_context(exp, RESULTS).latency
    return {"path": str(out), "dtype": meta.get("dtype"), "reference_ms": float(meta["reference_ms"]),
            "after_idle_ms": {p: lat.after_idle_ms(stem, p) for p in ("prefill", "decode")},
            "loop_ms": {p: lat.loop_ms(stem, p, B) for p in ("prefill", "decode")},
            "profile_s": time.monotonic() - started}


def profile_layers(device, stem: str, kernels, deadline: float, marlin_s: float, skipped: dict) -> list[dict]:
    """One OPT-30B layer and one Llama-3-70B-shaped layer at every bit-width and kernel (see the module docstring),
    beside the roofline; Marlin last and only with `marlin_s` seconds left."""
    import yaml

    from llmpq.config import QuantSpec
    from llmpq.costmodel.kernels import kernel_menu
    from llmpq.costmodel.latency import LatencyModel
    from llmpq.models.shape import shape_from_config
    from llmpq.profile.run import ProfileGrid, profile_rows

    opt = {**yaml.safe_load(Path("conf/model/opt-30b.yaml").read_text())["hf_config"], "num_hidden_layers": 1}
    grid = ProfileGrid(batches=(1, 16), prompt_lens=(512,), contexts=(1024,), warmup=2, repeats=5, min_time_ms=5,
                       max_repeats=10)
    quant = QuantSpec("gptq", 128)
    out = []
    for name, config in (("opt-30b", opt), ("llama-3-70b", LLAMA_70B_LAYER)):
        shape = shape_from_config(config)
        menu = kernel_menu(kernels, device, quant, shape)
        roofline = LatencyModel(shape, {stem: device}, quant, kernels=kernels)
        for kernel in KERNEL_ORDER:
            bits = tuple(b for b in device.bits if kernel in menu.get(b, ()))
            left = deadline - time.monotonic()
            if not bits:
                continue
            if left < (marlin_s if kernel == "marlin" else 20):
                skipped[f"layers/{name}/{kernel}"] = f"time budget: {left:.0f} s left"
                continue
            started = time.monotonic()
            rows = profile_rows(config, name, device, quant, grid, bits=bits, progress=False, kernels=kernels,
                                dtype="float16", only_kernels={kernel}, layers_only=True)
            for r in rows:
                r["roofline_ms"] = roofline.layer_ms(stem, r["bits"], r["phase"], r["batch"], r["q_tokens"],
                                                     r["context_len"], r["kernel"])
                r["seconds_for_kernel"] = time.monotonic() - started
            out.extend(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--marlin-s", type=float, default=240.0, help="budget left needed to try Marlin")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to check", file=sys.stderr)
        return 0
    from llmpq.config import compose_experiment, load_device
    from llmpq.config.compose import ConfigSearch
    from llmpq.config.dtypes import device_dtype
    from llmpq.config.identity import FoundDevice, matching_device
    from llmpq.costmodel.kernels import kernel_menu
    from llmpq.models.source import hf_config_dict, model_shape

    started = time.monotonic()
    deadline = started + args.budget_s
    props = torch.cuda.get_device_properties(0)
    found = FoundDevice(props.name, int(props.total_memory))
    short = re.sub(r"[^a-z0-9]+", "", props.name.lower().replace("nvidia", "").split()[0]) or "gpu"
    out = args.out or Path(f"benchmarks/results/gpu_check_{short}.json")
    stems = ConfigSearch().options("device")
    stem = matching_device({s: load_device(s) for s in stems}, found)
    result: dict = {"gpu": props.name, "memory_gib": props.total_memory / 2**30, "torch": torch.__version__,
                    "gpus_visible": torch.cuda.device_count(), "device_stem": stem, "parts": {}, "errors": {},
                    "skipped": {}}

    def save() -> None:
        result["elapsed_s"] = time.monotonic() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")

    def part(name: str, fn, min_left_s: float = 30.0) -> None:
        left = deadline - time.monotonic()
        if left < min_left_s:
            result["skipped"][name] = f"time budget: {left:.0f} s left"
        else:
            try:
                result["parts"][name] = fn()
                print(f"gpu_check {name}: done at {time.monotonic() - started:.0f} s", flush=True)
            except Exception as exc:  # record and go on: the other parts may still run
                result["errors"][name] = f"{type(exc).__name__}: {str(exc)[:800]}"
        save()

    if stem is None:
        result["errors"]["device"] = f"no conf/device config matches {found.describe()}"
        save()
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exp = compose_experiment([f"model.source={MODEL}", "cluster=gpu-check", "workload=s64-n16-b8"],
                                 config_dir=write_config_dir(tmp / "conf", stem))
        device = exp.devices[stem]
        auto = device_dtype(exp.model.dtype, hf_config_dict(exp.model), device)
        menu = kernel_menu(exp.kernels, device, exp.model.quant, model_shape(exp.model))
        low = {b: quick_kernel(menu[b]) for b in (8, 4) if menu.get(b)}
        part("tiny_profile", lambda: profile_tiny(exp, stem))
        plans = {"fp16": ((16, 16, 16, 16), {16: "fp16"}, "float16"),
                 f"fp16-{auto}": ((16, 16, 16, 16), {16: "fp16"}, auto),
                 "mixed": ((16, 8, 4, 4), {16: "fp16", **low}, "float16")}
        for label, (bits, kernels, dtype) in plans.items():
            part(f"plans/{label}", lambda b=bits, k=kernels, d=dtype, lab=label: check_plan(
                exp, predicted_plan(tmp / f"{lab}.json", exp, stem, [(0, 4)], b, k, d), tmp / f"{lab}.parquet", d))
        part("layers", lambda: profile_layers(device, stem, exp.kernels, deadline, args.marlin_s, result["skipped"]),
             min_left_s=60)
        if torch.cuda.device_count() >= 2:
            ring_exp = compose_experiment([f"model.source={MODEL}", "cluster=gpu-check", "workload=s64-n16-b8"],
                                          config_dir=write_config_dir(tmp / "conf2", stem, 2))
            part("ring", lambda: check_plan(ring_exp, predicted_plan(tmp / "ring.json", ring_exp, stem,
                                                                     [(0, 2), (2, 4)], (16,) * 4, {16: "fp16"},
                                                                     "float16"),
                                            tmp / "ring.parquet", "float16"))
        else:
            result["skipped"]["ring"] = f"{torch.cuda.device_count()} GPU visible: the two-stage ring needs two"
            save()
    ok = [k for k, v in result["parts"].items() if isinstance(v, dict) and v.get("tokens_match_hf")]
    print(f"gpu_check: {props.name} as {stem}: {len(result['parts'])} part(s) done, tokens equal to HF for "
          f"{', '.join(ok) or 'none'}; {len(result['errors'])} error(s), {len(result['skipped'])} skipped "
          f"in {time.monotonic() - started:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
