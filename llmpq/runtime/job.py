"""The job every stage process reads: the plan's stages with their devices and planned memory, the prompts,
where the weights are, and the run options. Written once by the launcher as JSON, so that stage processes
need no config composition and all ranks see exactly the same inputs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifacts import write_text
from ..config.identity import GpuIdentity

# The environment every stage process starts with (unless the caller sets these): one thread per op, and MKL's
# fast memory manager off. That manager keeps the buffers of each GEMM shape it has seen (`benchmarks/stage_memory.py`:
# 476 KiB after a tiny-opt last stage's warm-up, 12 KiB without), memory the stage holds but never uses again; without
# it the stage's RSS growth is its live data, and a layer call times the same (0.423 vs 0.428 ms, prefill).
STAGE_ENV = {"OMP_NUM_THREADS": "1", "MKL_DISABLE_FAST_MM": "1"}


@dataclass(frozen=True)
class StageSpec:
    """One stage: the device that runs it, its layers and bits, and its planned memory (bytes)."""

    index: int
    device: str                 # device config stem
    node: str
    kind: str                   # cpu | gpu
    device_name: str            # the GPU name the device config expects (nvidia-smi's, spaces as _)
    threads: int | None         # torch threads (a CPU device's `threads`)
    start: int
    end: int
    bits: tuple[int, ...]
    planned_weights_bytes: int
    planned_kv_bytes: int
    planned_total_bytes: int
    capacity_bytes: int
    cap_bytes: int | None       # a CPU device's memory_cap_gib, enforced before loading
    cuda_index: int | None = None
    kernels: tuple[tuple[int, str], ...] = ()   # (bits, weight kernel) from the plan
    component: int | None = None        # under a plan's SLURM job: its component, and what that component holds
    slurm_gres: str | None = None       # GRES without count (gpu:t4)
    slurm_partition: str | None = None
    name_pattern: str | None = None     # a GPU's identity: name pattern and memory (`llmpq.config.identity`)
    memory_gib: float | None = None
    reference_ms: float | None = None   # the device profile's idle reference timing (`llmpq.profile.reference`)

    @property
    def identity(self) -> GpuIdentity | None:
        """What the stage's GPU must be (None on a CPU)."""
        if self.kind == "cpu":
            return None
        return GpuIdentity(self.device, self.device_name, self.name_pattern, float(self.memory_gib or 0.0))

    @property
    def kernel_map(self) -> dict[int, str]:
        return dict(self.kernels)

    @property
    def first(self) -> bool:
        return self.index == 0


@dataclass(frozen=True)
class KernelNeeds:
    """What a weight kernel needs of the device a stage runs on (from the kernel table), checked by the stage
    process before it loads anything."""

    name: str
    device_kinds: tuple[str, ...]
    min_compute_capability: float | None = None


@dataclass(frozen=True)
class RunJob:
    """Everything a stage process needs to run its part of a plan."""

    method: str
    model_dir: str
    quant_root: str
    scheme: str
    prompts: tuple[tuple[int, ...], ...]
    gen_len: int
    micro_batch_prefill: int
    micro_batch_decode: int
    stages: tuple[StageSpec, ...]
    workdir: str
    backend: str = "gloo"
    timeout_s: float = 60.0
    record_logits: bool = False
    fault: str | None = None
    verify: bool = True
    warmup: bool = True
    kernel_needs: tuple[KernelNeeds, ...] = ()
    task_stages: tuple[int, ...] = ()   # under a plan's SLURM job: the stage of each task rank (SLURM_PROCID)
    dtype: str = "float32"      # compute dtype of every stage (`llmpq.config.dtypes`)
    repeats: int = 3            # timed runs of the whole schedule (prefill and decode), after the warm-up

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def prompt_len(self) -> int:
        return len(self.prompts[0])

    def report_path(self, rank: int) -> Path:
        """Where rank `rank` writes its `StageReport`."""
        return Path(self.workdir) / f"rank{rank}.json"

    def write(self, path: str | Path) -> Path:
        return write_text(json.dumps(asdict(self), sort_keys=True) + "\n", path)

    @staticmethod
    def read(path: str | Path) -> "RunJob":
        data = json.loads(Path(path).read_text())
        stages = tuple(StageSpec(**{**s, "bits": tuple(s["bits"]), "kernels": tuple(tuple(k) for k in s["kernels"])})
                       for s in data.pop("stages"))
        prompts = tuple(tuple(p) for p in data.pop("prompts"))
        needs = tuple(KernelNeeds(n["name"], tuple(n["device_kinds"]), n["min_compute_capability"])
                      for n in data.pop("kernel_needs", ()))
        task_stages = tuple(data.pop("task_stages", ()))
        return RunJob(stages=stages, prompts=prompts, kernel_needs=needs, task_stages=task_stages, **data)
