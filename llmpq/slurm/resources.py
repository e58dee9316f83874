"""Memory and wall time of a plan's SLURM job, from the plan (memory per stage, predicted run time).

Host memory of one stage process (bytes), before the margin:
- CPU stage: P_cpu + M_j, where M_j is the plan's total for the stage (weights + KV cache + activations +
  embedding/head + buffers): a CPU stage holds all of it in host memory;
- GPU stage: P_cuda + W_j + E_j + H_j: weights, embedding and head pass through host memory on their way to
  the GPU (an upper bound: the loader reads one layer file at a time); KV cache and activations live on the GPU.
P_cpu: a tiny-opt stage process of this runtime peaked at 448 MiB RSS (torch 2.13 CPU, transformers, gloo, the
schedule; the runs table's rss_bytes); 0.5 GiB taken. P_cuda: a process on an H100 held 1.08 GiB RSS after
importing torch 2.11+cu130 and transformers, a CUDA context, a cuBLAS fp16 matmul and an NCCL process group;
2 GiB taken, for the quantized kernels' libraries and older CUDA stacks.

Wall time (s) = startup_s + max_j(W_j) / load rate + time_margin x (prefill_s + decode_s) of the plan, in whole
minutes, at least `min_minutes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..config.errors import ConfigError
from ..config.types import DeviceSpec
from ..solve.plan import Plan, StagePlan

MIB = 1024**2
GIB = 1024**3
CPU_PROCESS_BYTES = GIB // 2
CUDA_PROCESS_BYTES = 2 * GIB


@dataclass(frozen=True)
class SlurmOptions:
    """The optional `slurm:` config block: margins of the jobs that llmpq submits itself.

    time_margin: factor on the plan's predicted run time. startup_s: seconds for starting, importing and warming
    up. load_gbps: rate at which a stage reads its weights (GB/s). min_minutes: shortest wall time asked.
    memory_margin: factor on each stage's host memory.
    """

    time_margin: float = 3.0
    startup_s: float = 300.0
    load_gbps: float = 0.5
    min_minutes: int = 5
    memory_margin: float = 1.25

    @staticmethod
    def from_raw(raw: Mapping[str, Any] | None) -> "SlurmOptions":
        """The block as composed (config.yaml's `slurm:` with overrides); ConfigError names the key at fault."""
        raw = dict(raw or {})
        known = [f.name for f in fields(SlurmOptions)]
        values: dict[str, Any] = {}
        for key, value in sorted(raw.items()):
            if key not in known:
                raise ConfigError("config", f"slurm.{key}", f"unknown key (known: {', '.join(known)})")
            cast = int if key == "min_minutes" else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or cast(value) <= 0:
                raise ConfigError("config", f"slurm.{key}", f"expected a number > 0, got {value!r}")
            values[key] = cast(value)
        return SlurmOptions(**values)


def stage_host_bytes(stage: StagePlan, device: DeviceSpec) -> int:
    """Host memory of one stage process before the margin (bytes): see the module docstring."""
    m = stage.memory
    if device.kind == "cpu":
        return CPU_PROCESS_BYTES + m.total_bytes
    return CUDA_PROCESS_BYTES + m.weights_bytes + m.embed_bytes + m.head_bytes


def stage_host_mib(stage: StagePlan, device: DeviceSpec, options: SlurmOptions) -> int:
    """`stage_host_bytes` times the memory margin, in whole MiB (what `sbatch --mem` is given per task)."""
    return math.ceil(stage_host_bytes(stage, device) * options.memory_margin / MIB)


def job_seconds(plan: Plan, options: SlurmOptions) -> float:
    """startup_s + the largest stage's weights / load rate + time_margin x (prefill_s + decode_s) (s)."""
    load_s = max(s.memory.weights_bytes for s in plan.stages) / (options.load_gbps * 1e9)
    return options.startup_s + load_s + options.time_margin * (plan.prefill_s + plan.decode_s)


def job_minutes(plan: Plan, options: SlurmOptions) -> int:
    """`job_seconds` in whole minutes (`sbatch --time`), at least `min_minutes`."""
    return max(options.min_minutes, math.ceil(job_seconds(plan, options) / 60))
