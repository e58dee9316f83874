"""Launch scripts and README of an exported plan: the partition, the rank -> device order, the engine knobs.

The partition is exact: `VLLM_PP_LAYER_PARTITION` (`SGLANG_PP_LAYER_PARTITION`) lists the plan's layer
counts in stage order, and pipeline rank r runs stage r. The micro-batches are an approximation, because
neither engine splits micro-batches by phase as the plan does (b_p sequences per prefill micro-batch, b_d
per decode micro-batch):

- vLLM: `--max-num-seqs b_d` (sequences per scheduled batch; with N stages up to N batches are in flight,
  so at most N·b_d sequences run at once, where the plan cycles ⌈B/b_d⌉ micro-batches), and chunked prefill
  with `--max-num-batched-tokens max(b_p·s, b_d)` (prompt tokens per step: one prefill micro-batch);
- SGLang: `--pp-max-micro-batch-size b_d`, `--max-running-requests B`, `--chunked-prefill-size b_p·s`.

`--max-model-len` (`--context-length`) is s + n. `--dtype float16`: the generic GPTQ kernel takes fp16
activations only, and Volta/Turing GPUs have no bf16. `--quantization gptq` where a stage's device has no
Marlin (the engine would otherwise pick Marlin for the whole model from the top-level bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..config import DeviceSpec, WorkloadSpec
from ..solve.plan import Plan
from .engine import FP_BITS, MARLIN, quantized_kernel

PARTITION_ENV = {"vllm": "VLLM_PP_LAYER_PARTITION", "sglang": "SGLANG_PP_LAYER_PARTITION"}
DISPLAY = {"vllm": "vLLM", "sglang": "SGLang"}
SCRIPTS = {"vllm": "launch.sh", "sglang": "launch_sglang.sh"}


@dataclass(frozen=True)
class EngineSettings:
    """The engine knobs an exported plan maps onto (module docstring)."""

    stages: int
    partition: tuple[int, ...]       # layers per stage, in stage order
    max_model_len: int               # the longest prompt + n
    max_num_seqs: int                # b_d
    max_batched_tokens: int          # max(b_p·s, b_d)
    max_running: int                 # B
    force_generic: bool              # a stage's device has no Marlin: --quantization gptq
    multi_node: bool


def engine_settings(plan: Plan, workload: WorkloadSpec, devices: Mapping[str, DeviceSpec]) -> EngineSettings:
    """The knobs of `plan` for `workload`."""
    quantized = any(b < FP_BITS for b in plan.bits)
    kernels = {quantized_kernel(devices[s.device]) for s in plan.stages if devices[s.device].kind == "gpu"}
    return EngineSettings(
        stages=len(plan.stages), partition=tuple(s.end - s.start for s in plan.stages),
        max_model_len=workload.kv_len, max_num_seqs=plan.micro_batch_decode,
        max_batched_tokens=max(plan.micro_batch_prefill * workload.prompt_len, plan.micro_batch_decode),
        max_running=workload.batch, force_generic=quantized and bool(kernels - {MARLIN}),
        multi_node=len({s.node for s in plan.stages}) > 1)


def _kernels(bits: tuple[int, ...], device: DeviceSpec) -> str:
    names = sorted({"fp16" if b == FP_BITS else f"{quantized_kernel(device)}" for b in bits})
    return "/".join(names)


def stage_lines(plan: Plan, devices: Mapping[str, DeviceSpec]) -> list[str]:
    """One line per pipeline rank: device, node, layers, bits, kernels."""
    lines = []
    for j, s in enumerate(plan.stages):
        d = devices[s.device]
        cc = f", cc {d.compute_capability:g}" if d.compute_capability else ""
        lines.append(f"rank {j}: {s.device} ({d.name}{cc}) on node {s.node}, layers {s.start}-{s.end - 1} "
                     f"({s.end - s.start}), bits {' '.join(map(str, s.bits))}, kernels {_kernels(s.bits, d)}")
    return lines


def _device_order(plan: Plan, devices: Mapping[str, DeviceSpec], multi_node: bool) -> list[str]:
    """Lines that make the user place ranks on the right GPUs: on each node, CUDA_VISIBLE_DEVICES in stage
    order wherever the node's stages run on different GPU types (nothing to do where they are alike)."""
    if {devices[s.device].kind for s in plan.stages} == {"cpu"}:
        return ["# CPU stages: run with the engine's CPU build (its pipeline parallelism and GPTQ kernels on CPU",
                "# are not checked by llmpq)."]
    by_node: dict[str, list[str]] = {}
    for s in plan.stages:
        by_node.setdefault(s.node, []).append(devices[s.device].name)
    mixed = {node: names for node, names in by_node.items() if len(set(names)) > 1}
    if not mixed:
        return []
    if not multi_node:
        order = ", ".join(by_node[plan.stages[0].node])
        return ["# Pipeline rank r runs on the r-th GPU of CUDA_VISIBLE_DEVICES: list the GPUs in stage order",
                f"# ({order}; indices from `nvidia-smi -L`).",
                f': "${{CUDA_VISIBLE_DEVICES:?set CUDA_VISIBLE_DEVICES to the GPU indices in stage order: {order}}}"']
    return [f"# On node {node}, set CUDA_VISIBLE_DEVICES to its GPUs in stage order ({', '.join(names)}) before "
            "`ray start`." for node, names in mixed.items()]


def _header(engine: str, plan: Plan, workload: WorkloadSpec, devices: Mapping[str, DeviceSpec],
            settings: EngineSettings) -> list[str]:
    lines = ["#!/usr/bin/env bash",
             f"# {DISPLAY[engine]} launch of llmpq plan '{plan.method}': {plan.model} on {plan.cluster}, workload {plan.workload}",
             f"# (B={workload.batch} prompts of s={workload.prompt_len} tokens, n={workload.gen_len} new tokens each).",
             "# Stage -> device, in pipeline order:"]
    lines += [f"#   {line}" for line in stage_lines(plan, devices)]
    lines += [f"# Micro-batches: the plan prefills b_p={plan.micro_batch_prefill} and decodes b_d={plan.micro_batch_decode} "
              "sequences per micro-batch;",
              f"# {DISPLAY[engine]} does not split micro-batches by phase, so the knobs below approximate them "
              "(README.md)."]
    if settings.force_generic:
        lines += ["# --quantization gptq: a stage's device has no Marlin kernel (compute capability < 8.0 or not",
                  "# given), and the engine chooses one kernel for the whole model."]
    if settings.multi_node:
        lines += ["# Stages span nodes: start a Ray cluster first (`ray start --head` on the node of rank 0,",
                  "# `ray start --address=HEAD:6379` on the others) and run this script on the head node. The engine",
                  "# places the other nodes' ranks itself: check in its log that each rank got the GPU listed above."]
    return lines + ["set -euo pipefail", 'cd "$(dirname "$0")"']


def vllm_script(plan: Plan, workload: WorkloadSpec, devices: Mapping[str, DeviceSpec], settings: EngineSettings) -> str:
    """launch.sh: `vllm serve` of the directory, and the same settings as an offline `LLM(...)` in comments."""
    partition = ",".join(map(str, settings.partition))
    args = [f"--pipeline-parallel-size {settings.stages}", "--tensor-parallel-size 1", "--dtype float16",
            f"--max-model-len {settings.max_model_len}", f"--max-num-seqs {settings.max_num_seqs}",
            "--enable-chunked-prefill", f"--max-num-batched-tokens {settings.max_batched_tokens}"]
    args += ["--quantization gptq"] if settings.force_generic else []
    args += ["--distributed-executor-backend ray"] if settings.multi_node else []
    kwargs = [f"pipeline_parallel_size={settings.stages}", 'dtype="float16"', f"max_model_len={settings.max_model_len}",
              f"max_num_seqs={settings.max_num_seqs}", "enable_chunked_prefill=True",
              f"max_num_batched_tokens={settings.max_batched_tokens}"]
    kwargs += ['quantization="gptq"'] if settings.force_generic else []
    kwargs += ['distributed_executor_backend="ray"'] if settings.multi_node else []
    lines = _header("vllm", plan, workload, devices, settings) + _device_order(plan, devices, settings.multi_node)
    lines += [f'export {PARTITION_ENV["vllm"]}="{partition}"   # layers per pipeline stage, in stage order',
              'exec vllm serve "$PWD" \\']
    lines += [f"  {a} \\" for a in args] + ['  "$@"', "",
              "# Offline batch (Python), the same settings:",
              "#   import os",
              f'#   os.environ["{PARTITION_ENV["vllm"]}"] = "{partition}"',
              "#   from vllm import LLM, SamplingParams",
              f"#   llm = LLM(model=DIR, {', '.join(kwargs)})",
              f"#   outputs = llm.generate(prompts, SamplingParams(max_tokens={workload.gen_len}, temperature=0))"]
    return "\n".join(lines) + "\n"


def sglang_script(plan: Plan, workload: WorkloadSpec, devices: Mapping[str, DeviceSpec], settings: EngineSettings) -> str:
    """launch_sglang.sh: `python -m sglang.launch_server` of the directory with the same partition."""
    partition = ",".join(map(str, settings.partition))
    args = [f"--pp-size {settings.stages}", "--tp-size 1", "--dtype float16",
            f"--context-length {settings.max_model_len}", f"--pp-max-micro-batch-size {settings.max_num_seqs}",
            f"--max-running-requests {settings.max_running}",
            f"--chunked-prefill-size {settings.max_batched_tokens}"]
    args += ["--quantization gptq"] if settings.force_generic else []
    lines = _header("sglang", plan, workload, devices, settings) + _device_order(plan, devices, settings.multi_node)
    lines += [f'export {PARTITION_ENV["sglang"]}="{partition}"   # layers per pipeline stage, in stage order',
              'exec python -m sglang.launch_server --model-path "$PWD" \\']
    lines += [f"  {a} \\" for a in args] + ['  "$@"']
    return "\n".join(lines) + "\n"


def readme(engine: str, plan: Plan, workload: WorkloadSpec, devices: Mapping[str, DeviceSpec],
           settings: EngineSettings, weight_files: tuple[str, ...], dynamic: Mapping[str, object] | None) -> str:
    """README.md of the directory: what the plan is, how to start it, which GPU each rank needs."""
    script, name = SCRIPTS[engine], DISPLAY[engine]
    rows = ["| rank | device | GPU / CPU name | compute capability | node | layers | bits | kernels |",
            "|---:|---|---|---:|---|---|---|---|"]
    for j, s in enumerate(plan.stages):
        d = devices[s.device]
        cc = f"{d.compute_capability:g}" if d.compute_capability else "-"
        rows.append(f"| {j} | {s.device} | {d.name} | {cc} | {s.node} | {s.start}-{s.end - 1} | "
                    f"{' '.join(map(str, s.bits))} | {_kernels(s.bits, d)} |")
    cpu_only = {devices[s.device].kind for s in plan.stages} == {"cpu"}
    quant = ("All layers are 16-bit: a plain checkpoint, no `quantize_config.json`." if dynamic is None else
             f"`quantize_config.json` (also `quantization_config` in config.json) gives each decoder layer its "
             f"bits in `dynamic` ({len(dynamic)} rules, first match wins; `-:` = left unquantized, 16-bit).")
    predicted = (f"{plan.throughput_tok_s:.1f} tok/s (prefill {plan.prefill_s:.3f} s, decode {plan.decode_s:.3f} s, "
                 f"{plan.latency_source} latency)")
    quality = f"Σω {plan.omega:.3g}" + ("" if plan.ppl_increase is None else f", predicted perplexity +{plan.ppl_increase:.2f}%")
    return "\n".join([
        f"# {plan.model} for {name}: llmpq plan `{plan.method}` on `{plan.cluster}`",
        "",
        f"Exported by llmpq from the plan in `llmpq_plan.json` (workload `{plan.workload}`: B={workload.batch}, "
        f"s={workload.prompt_len}, n={workload.gen_len}). Predicted by llmpq's own cost model for its own runtime: "
        f"{predicted}; {quality}. {name} schedules differently, so its throughput will differ.",
        "",
        "## Start it",
        "",
        f"`bash {script}` (extra arguments go to the engine). It sets the pipeline split "
        f"`{PARTITION_ENV[engine]}={','.join(map(str, settings.partition))}` (layers per stage) with "
        f"{settings.stages} pipeline stage(s) and tensor parallel size 1."
        + (" The offline `LLM(...)` form is at the end of the script." if engine == "vllm" else ""),
        "",
        "## Which device each rank needs",
        "",
        *rows,
        "",
        "Pipeline rank r runs stage r (the first holds the embedding, the last the head). "
        + (f"CPU stages need {name}'s CPU build (its pipeline parallelism and GPTQ kernels on CPU are not checked "
           "by llmpq)." if cpu_only else
           "On one node, rank r takes the r-th GPU of `CUDA_VISIBLE_DEVICES`: list the GPUs in the order above.")
        + (" Stages span nodes: start Ray on every node first (the script says how) and check in the engine's "
           "log that each rank got the GPU listed above." if settings.multi_node else ""),
        "",
        "## Micro-batches (an approximation)",
        "",
        f"The plan prefills b_p={plan.micro_batch_prefill} and decodes b_d={plan.micro_batch_decode} sequences per "
        f"micro-batch. {name} does not split micro-batches by phase, so the script maps them onto "
        + ("`--max-num-seqs` = b_d (with N stages up to N batches are in flight: at most N·b_d sequences run at "
           "once) and chunked prefill with `--max-num-batched-tokens` = max(b_p·s, b_d)."
           if engine == "vllm" else
           "`--pp-max-micro-batch-size` = b_d, `--max-running-requests` = B and `--chunked-prefill-size` = b_p·s."),
        "",
        "## Weights",
        "",
        f"{', '.join(f'`{f}`' for f in weight_files)}: the exact tensors the plan deploys (GPTQ v1 layout, "
        f"`checkpoint_format: gptq`), 16-bit tensors at the source dtype (the engine casts them to `--dtype float16`). "
        f"{quant} Check on CPU without an engine: "
        "`GPTQModel.load(DIR, device=\"cpu\", backend=BACKEND.TORCH)`.",
        "",
    ])


def script_text(engine: str, plan: Plan, workload: WorkloadSpec, devices: Mapping[str, DeviceSpec],
                settings: EngineSettings) -> str:
    """The launch script of `engine`."""
    return (vllm_script if engine == "vllm" else sglang_script)(plan, workload, devices, settings)
