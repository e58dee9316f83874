"""One pipeline stage process: `python -m llmpq.runtime.stage JOB.json`.

The same entry point under torchrun (rank and world from RANK / WORLD_SIZE / LOCAL_RANK) and under srun
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, with MASTER_ADDR / MASTER_PORT set by the launcher). Rank j
runs stage j of the job (in a plan's SLURM job, which lists `task_stages`, the task's component and rank say
which stage it runs, and a task that is not where the job put its stage fails before loading): before loading
anything it checks its device's memory cap, that its GPU is the planned type (name pattern and memory) and that
its device can run the plan's weight kernels; joins the process group and creates its ring links in the global
start-up order (`Ring.connect`); notes its memory baseline (on a CPU after a throwaway step of its first layer,
`prime_stage`, and after the idle reference timing), loads only its layers (each quantized bit-width on the
plan's kernel, in the job's dtype, and the embedding or head where it is first or last), runs the schedule
`repeats` times while its memory is sampled, and writes its report (medians and every repetition) beside the
job. Any error ends the process non-zero; its peers then fail on the broken connection or time out, and the
launcher (torchrun, or srun --kill-on-bad-exit) stops the rest.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..artifacts import write_text
from ..config.dtypes import DTYPES
from ..config.identity import FoundDevice, identity_mismatch
from ..profile.reference import reference_ms
from .caps import DeviceMismatch, MemoryCapError, StageRefusal, cap_violation
from .comm import Ring
from .job import RunJob, StageSpec
from .kernel_check import KernelUnavailable, stage_kernel_problem
from .kvcache import StageKVCache, cache_shape
from .measure import (MemoryStats, StageClock, StageMemorySampler, keep_freed_memory, prime_math_libraries,
                      return_freed_memory)
from .parts import load_stage, prepare_stage
from ..profile.timing import torch_threads
from .schedule import Fault, StageRunner, plan_steps, prime_stage
from .slurm_run import PlacementError, slurm_stage

CAP_EXIT_CODE = 3


@dataclass(frozen=True)
class Placement:
    """Which stage this process runs and which local accelerator it may use."""

    rank: int
    world: int
    local_rank: int


def placement_from_env(env: Mapping[str, str] | None = None) -> Placement:
    """Rank, world size and local rank from torchrun's variables, else from SLURM's, else a single process."""
    env = os.environ if env is None else env
    for rank, world, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in env and world in env:
            return Placement(int(env[rank]), int(env[world]), int(env.get(local, 0)))
    return Placement(0, 1, 0)


@dataclass(frozen=True)
class StageReport:
    """What one stage measured, and its outputs (tokens from the first stage, logits from the last).

    `phases`: each phase's figures from its median repetition (`median_phases`); `repetitions`: each repetition's
    (`StageClock.to_dict`); `reference_ms`: the idle reference timing taken just before the schedule."""

    rank: int
    device: str
    host: str
    phases: dict[str, dict[str, float]]
    memory: dict[str, int]
    tokens: list[list[int]] | None = None
    first_logits: list[list[float]] | None = None
    last_logits: list[list[float]] | None = None
    repetitions: list[dict[str, dict[str, float]]] | None = None
    reference_ms: float | None = None

    def write(self, path: str | Path) -> Path:
        return write_text(json.dumps(asdict(self)) + "\n", path)

    @staticmethod
    def read(path: str | Path) -> "StageReport":
        return StageReport(**json.loads(Path(path).read_text()))


def median_phases(repetitions: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Each phase's figures from its median repetition (by the phase's wall time; the lower one of an even count),
    so that compute, wait and wall stay one repetition's."""
    out = {}
    for phase in repetitions[0]:
        ranked = sorted(repetitions, key=lambda r: r[phase]["wall_ms"])
        out[phase] = {k: float(v) for k, v in ranked[(len(ranked) - 1) // 2][phase].items()}
    return out


def torch_dtype(name: str) -> torch.dtype:
    """float32 | float16 | bfloat16 -> the torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return getattr(torch, name)


def found_gpu(index: int) -> FoundDevice:
    """The CUDA device `index` as the driver reports it."""
    props = torch.cuda.get_device_properties(index)
    return FoundDevice(props.name, int(props.total_memory))


def torch_device(spec: StageSpec, local_rank: int) -> torch.device:
    """The torch device of a stage: the CPU, or the GPU the stage was given, checked to be the planned type
    (`llmpq.config.identity`: name pattern and memory) before anything is loaded (`DeviceMismatch` names both)."""
    if spec.kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceMismatch(f"stage {spec.index} runs on GPU device {spec.device} but no CUDA device is visible")
    device = torch.device("cuda", spec.cuda_index if spec.cuda_index is not None else local_rank)
    assert spec.identity is not None
    problem = identity_mismatch(spec.identity, found_gpu(device.index))
    if problem is not None:
        raise DeviceMismatch(f"stage {spec.index} on {device}: {problem}")
    torch.cuda.set_device(device)
    return device


def _as_lists(t: torch.Tensor | None) -> list | None:
    return None if t is None else t.cpu().tolist()


def stage_cores(job: RunJob, place: Placement, allowed: Sequence[int]) -> list[int] | None:
    """The cores a CPU stage process of a multi-process run keeps to: `threads` of this process's `allowed` cores
    (its CPU affinity), after those of the CPU stages before it on the same node, as SLURM's `--cpu-bind` gives a
    task its own cores, so that the OS does not move a stage onto a core another stage computes on (the default
    table's deploys on this 2-core machine: 1 of 14 rows off its prediction by more than 20% in two runs with it,
    4 of 14 without). None where nothing is to pin: one process, a GPU stage, a task already bound to its own
    cores, or more threads than allowed cores."""
    spec = job.stages[place.rank]
    if place.world < 2 or spec.kind != "cpu":
        return None
    threads = spec.threads or 1
    before = sum(s.threads or 1 for s in job.stages[:place.rank] if s.node == spec.node and s.kind == "cpu")
    cores = sorted(allowed)
    if len(cores) <= threads or before + threads > len(cores):
        return None
    return cores[before:before + threads]


def run_stage(job: RunJob, place: Placement, init_dist: bool = True) -> StageReport:
    """Run stage `place.rank` of `job`: cap, device and kernel checks, (process group and its start-up exchanges),
    load, reference timing, schedule; its report."""
    spec = job.stages[place.rank]
    problem = cap_violation(spec)
    if problem is not None:
        raise MemoryCapError(problem)
    device, dtype = torch_device(spec, place.local_rank), torch_dtype(job.dtype)
    problem = stage_kernel_problem(spec, device, {n.name: n for n in job.kernel_needs})
    if problem is not None:
        raise KernelUnavailable(problem)
    cpu = device.type == "cpu"
    cores = stage_cores(job, place, sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else None
    if cores is not None:
        os.sched_setaffinity(0, cores)
    if cpu:
        keep_freed_memory()  # the profile's allocator mode, for the reference timing
    with torch_threads(spec.threads), torch.inference_mode():
        clock = StageClock(device)
        ring = None
        if place.world > 1:
            if init_dist:
                _init_process_group(job, place, device)
            ring = Ring(place.rank, place.world, clock, device, timedelta(seconds=job.timeout_s))
            ring.connect()
        manifests = prepare_stage(job.model_dir, job.quant_root, job.scheme, spec.bits,
                                  {k for _, k in spec.kernels}, job.verify)
        if ring is not None:
            from transformers import AutoConfig

            hidden = AutoConfig.from_pretrained(job.model_dir).hidden_size
            ring.prime((job.micro_batch_prefill, job.prompt_len, hidden), dtype, job.micro_batch_decode)
        if cpu:
            prime_math_libraries(dtype)
            prime_stage(_first_layers(job, spec, device, dtype, manifests), device, dtype)
            gc.collect()
        reference = reference_ms(device, dtype if device.type == "cuda" else torch.float32)
        if cpu:
            return_freed_memory()
        sampler = StageMemorySampler(device, trim=cpu).start()
        model = load_stage(job.model_dir, job.quant_root, job.scheme, spec.start, spec.bits, first=spec.first,
                           last=spec.index == len(job.stages) - 1, device=device, dtype=dtype, verify=job.verify,
                           kernels=spec.kernel_map, manifests=manifests)
        sequences = -(-job.batch // job.micro_batch_decode) * job.micro_batch_decode
        cache = StageKVCache(cache_shape(model.config, spec.start, spec.end - spec.start, sequences,
                                         job.prompt_len + job.gen_len), dtype, device)
        fault = Fault.parse(job.fault) if job.fault else None
        runner = StageRunner(model, cache, clock, job.batch, job.gen_len, ring, fault, job.record_logits)
        prompts = torch.tensor(job.prompts, dtype=torch.long, device=device)
        steps = plan_steps(job.batch, job.prompt_len, job.gen_len, job.micro_batch_prefill, job.micro_batch_decode)
        measured: list[MemoryStats] = []

        def memory_pass() -> None:
            measured.append(sampler.stop(model.weight_bytes(), cache.nbytes))
            keep_freed_memory()

        out, repetitions = runner.run(prompts, steps, job.warmup, job.repeats, memory_pass if cpu else None)
        memory = measured[0] if measured else sampler.stop(model.weight_bytes(), cache.nbytes)
    return StageReport(place.rank, spec.device, platform.node(), median_phases(repetitions), asdict(memory),
                       _as_lists(out.tokens), _as_lists(out.first_logits), _as_lists(out.last_logits),
                       repetitions, reference)


def _first_layers(job: RunJob, spec: StageSpec, device: torch.device, dtype: torch.dtype,
                  manifests: Mapping[int, Any]) -> Any:
    """A throwaway copy of the stage's first layer of each bit-width, with its embedding and head (`prime_stage`)."""
    firsts = {}
    for i, b in enumerate(spec.bits):
        firsts.setdefault(b, spec.start + i)
    index = min(firsts.values())
    bits = [spec.bits[index - spec.start]]
    return load_stage(job.model_dir, job.quant_root, job.scheme, index, bits, first=spec.first,
                      last=spec.index == len(job.stages) - 1, device=device, dtype=dtype, verify=False,
                      kernels={b: k for b, k in spec.kernels if b in firsts}, manifests=manifests)


def _init_process_group(job: Any, place: Placement, device: torch.device) -> None:
    import torch.distributed as dist

    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(job.backend, rank=place.rank, world_size=place.world,
                            timeout=timedelta(seconds=job.timeout_s), **kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m llmpq.runtime.stage JOB.json", file=sys.stderr)
        return 2
    job = RunJob.read(argv[0])
    place = placement_from_env()
    where, slot = f"llmpq stage {place.rank}", ""
    if job.task_stages:
        try:
            stage, index, slot = slurm_stage(job, os.environ)
        except (PlacementError, KeyError, ValueError) as exc:
            print(f"llmpq task {os.environ.get('SLURM_PROCID', '?')}: placement error: {exc}", file=sys.stderr,
                  flush=True)
            return 1
        place = Placement(stage, len(job.stages), index)
        where = f"llmpq stage {stage}"
        print(f"{where} ({job.stages[stage].device}): {slot}", flush=True)
    return run_and_report(job, place, where, run_stage, slot)


def run_and_report(job: Any, place: Placement, where: str, run: Callable[[Any, Placement], Any], slot: str = "") -> int:
    """A stage process's body after its placement (deploy's and the batch job's): run this rank's stage, write its
    report and leave the process group. Exit codes: 0, 2 for a world that does not match the plan,
    CAP_EXIT_CODE for a stage refused before loading, 1 for any other failure (named with `where`)."""
    if place.world != len(job.stages):
        print(f"{where}: started with {place.world} processes for a plan of {len(job.stages)} stages", file=sys.stderr)
        return 2
    where += f" ({job.stages[place.rank].device}{', ' + slot if slot else ''})"
    try:
        report = run(job, place)
    except StageRefusal as exc:
        print(f"{where}: {exc}", file=sys.stderr, flush=True)
        return CAP_EXIT_CODE
    except Exception as exc:
        traceback.print_exc()
        print(f"{where}: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    report.write(job.report_path(place.rank))
    if place.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
