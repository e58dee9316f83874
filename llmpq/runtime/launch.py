"""`llmpq deploy plan=PLAN [out=RUNS.parquet]`: run a plan with one process per stage and record what it measured.

The launcher checks the plan against the experiment, every stage's weight kernels against its device
(`kernel_check`) and every stage's planned memory against its device's memory cap (before anything is
loaded), samples the workload's prompts, writes the job every stage reads, then starts the stages:

- one stage: in this process, without messages;
- inside a SLURM allocation of at least N tasks (SLURM_JOB_ID set; SLURM_NTASKS, or `scontrol show job`):
  `srun --kill-on-bad-exit=1 -n N python -m llmpq.runtime.stage JOB`, with MASTER_ADDR the first node of
  the allocation and a free MASTER_PORT;
- otherwise torchrun on this node (`python -m torch.distributed.run --standalone --nproc-per-node N -m
  llmpq.runtime.stage JOB`; it stops every worker as soon as one fails);
- `launcher: sbatch` (what the workflow's rule passes under the Snakemake SLURM executor): one SLURM job for all
  stages, heterogeneous where they need different device requests or plan nodes, submitted from here and waited
  for (`llmpq.runtime.slurm_run`).

Stages talk over torch.distributed: gloo on CPUs, NCCL on GPUs. Options come from the config's optional
`deploy:` block (`DeployOptions`). The runs table and its tokens sidecar are written only after every
stage has succeeded, atomically; outputs of an earlier run are removed once the plan has passed its checks,
so a failed run leaves none.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .. import paths
from ..artifacts import provenance, read_meta, write_table
from ..config.identity import FoundDevice, identity_mismatch
from ..config import Experiment
from ..generate.planning import planning_experiment
from ..slurm.hetjob import SlurmJob
from ..slurm.rendezvous import first_slurm_node, free_port
from ..slurm.submit import SubmitError
from ..profile.load import is_loaded, load_average
from ..progress import PROGRESS_FD_ENV
from ..progress import bar as console_bar
from ..solve.plan import Plan, read_plan
from ..solve.skip import infeasible_record, write_skipped
from .caps import DeviceMismatch, StageRefusal, check_caps, planned_memory
from .job import STAGE_ENV, RunJob, StageSpec
from .kernel_check import KernelUnavailable, kernel_needs, plan_kernel_problems
from .report import run_rows, sidecar, tokens_path, write_sidecar
from .schedule import Fault
from .slurm_run import run_on_slurm, slurm_layout
from .stage import Placement, StageReport, run_stage

LAUNCHERS = ("auto", "torchrun", "srun", "sbatch")
STAGE_MODULE = "llmpq.runtime.stage"


class DeployError(RuntimeError):
    """A stage process failed, or the run did not produce every stage's report."""


@dataclass(frozen=True)
class DeployOptions:
    """The optional `deploy:` config block.

    timeout_s: how long a stage waits for a peer (process group timeout) before it fails.
    seed: which prompts are sampled from the workload's text. launcher: auto | torchrun | srun | sbatch.
    record_logits: also keep the logits of the first and last generated tokens (in the tokens sidecar).
    fault: a test hook, RANK:ROUND:exit|hang (`llmpq.runtime.schedule.Fault`).
    verify: check every layer file's sha256 against its store's manifest before loading it.
    warmup: run untimed calls of every step shape on each stage before the clocks start.
    repeats: timed runs of the whole schedule in the same stage processes (>= 1; the runs table keeps the median,
    min and max of each phase).
    """

    timeout_s: float = 60.0
    seed: int = 0
    launcher: str = "auto"
    record_logits: bool = False
    fault: str | None = None
    verify: bool = True
    warmup: bool = True
    repeats: int = 3

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"deploy.repeats: must be >= 1, got {self.repeats}")
        if self.timeout_s <= 0:
            raise ValueError(f"deploy.timeout_s: must be > 0, got {self.timeout_s}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"deploy.launcher: {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.fault is not None:
            Fault.parse(self.fault)

    @staticmethod
    def from_raw(raw: Mapping[str, Any] | None) -> "DeployOptions":
        raw = dict(raw or {})
        known = {f.name: f for f in fields(DeployOptions)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"deploy: unknown keys {unknown} (known: {sorted(known)})")
        casts = {"timeout_s": float, "seed": int, "launcher": str, "record_logits": bool, "verify": bool,
                 "warmup": bool, "repeats": int, "fault": lambda v: None if v is None else str(v)}
        return DeployOptions(**{k: casts[k](v) for k, v in raw.items()})


@dataclass(frozen=True)
class DeployResult:
    """A finished run: where its table went, its rows and its sidecar."""

    out: Path
    rows: list[dict[str, Any]]
    sidecar: dict[str, Any]


def check_plan(exp: Experiment, plan: Plan, num_layers: int, max_positions: int, where: str) -> None:
    """The plan must be for this experiment's model, cluster and workload, on its devices, within its positions."""
    mine = (exp.model.name, exp.cluster.name, exp.workload.name)
    theirs = (plan.model, plan.cluster, plan.workload)
    if mine != theirs:
        raise ValueError(f"{where}: plan is for model/cluster/workload {'/'.join(theirs)}, the experiment is "
                         f"{'/'.join(mine)} (pass model=, cluster= and workload= to match)")
    unknown = sorted({s.device for s in plan.stages} - set(exp.devices))
    if unknown:
        raise ValueError(f"{where}: devices {unknown} are not in cluster {exp.cluster.name}")
    if plan.num_layers != num_layers:
        raise ValueError(f"{where}: plan covers {plan.num_layers} layers, model {exp.model.name} has {num_layers}")
    need = exp.workload.kv_len
    if need > max_positions:
        raise ValueError(f"{where}: workload {exp.workload.name} needs {need} positions, model {exp.model.name} "
                         f"has {max_positions}")
    kinds = {exp.devices[s.device].kind for s in plan.stages}
    if len(kinds) > 1:
        raise ValueError(f"{where}: plan mixes CPU and GPU stages, which one process group cannot connect")


def cuda_assignment(specs: Sequence[StageSpec], found: Sequence[FoundDevice] | None = None) -> list[int | None]:
    """For a one-node GPU run: each stage's CUDA index, the first unused GPU of the stage's planned type (name
    pattern and memory, `llmpq.config.identity`); `found`: the GPUs here (default: asked of CUDA). DeviceMismatch
    names the stage, its planned device and the free GPUs, before anything is loaded."""
    if all(s.kind == "cpu" for s in specs):
        return [None] * len(specs)
    if found is None:
        import torch

        from .stage import found_gpu

        found = [found_gpu(i) for i in range(torch.cuda.device_count())]
    free = list(range(len(found)))
    out: list[int | None] = []
    for s in specs:
        assert s.identity is not None
        match = next((i for i in free if identity_mismatch(s.identity, found[i]) is None), None)
        if match is None:
            raise DeviceMismatch(f"stage {s.index} needs a {s.device} ({s.device_name}); free GPUs here: "
                                 f"{[found[i].describe() for i in free] or 'none'}")
        free.remove(match)
        out.append(match)
    return out


def profiled_reference_ms(results: Path, device: str, model: str) -> float | None:
    """The idle reference timing recorded with the device's profile of the model (None without one)."""
    path = paths.profile_path(results, device, model)
    if not path.is_file():
        return None
    value = read_meta(path).get("reference_ms")
    return float(value) if value else None


def stage_specs(exp: Experiment, plan: Plan, shape: Any, results: Path | None = None) -> list[StageSpec]:
    """Every stage of the plan with its device (and its identity), weight kernels, planned memory and its profile's
    reference timing (from `results`); KernelUnavailable naming every stage whose planned kernel its device
    cannot run."""
    problems = plan_kernel_problems(exp, plan, shape)
    if problems:
        raise KernelUnavailable("refusing to deploy: " + "; ".join(problems))
    memory = planned_memory(exp, shape, plan, exp.kernels)
    specs = []
    for j, (s, mem) in enumerate(zip(plan.stages, memory)):
        dev = exp.devices[s.device]
        cap = int(dev.memory_cap_gib * 1024**3) if dev.kind == "cpu" and dev.memory_cap_gib is not None else None
        specs.append(StageSpec(j, s.device, s.node, dev.kind, dev.name, dev.threads, s.start, s.end, s.bits,
                               mem.weights_bytes, mem.kv_bytes, mem.total_bytes, mem.capacity_bytes, cap,
                               kernels=s.kernels, name_pattern=dev.name_pattern, memory_gib=dev.memory_gib,
                               reference_ms=profiled_reference_ms(results, s.device, exp.model.name)
                               if results is not None else None))
    return specs


def sample_prompts_for(exp: Experiment, model_dir: Path, seed: int) -> list[list[int]]:
    """B real prompts of s tokens from the workload's text source (for a prompts-file workload, whose s is its
    planning length, the configured eval text `eval.source`), tokenised with the model's tokenizer."""
    from transformers import AutoTokenizer

    from ..data.text import sample_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    w = exp.workload
    source = str(exp.raw["eval"]["source"]) if w.prompts_file else w.prompts
    return sample_prompts(source, tokenizer, w.batch, w.prompt_len, seed=seed)


def allocation_tasks(env: Mapping[str, str]) -> int | None:
    """Tasks of the SLURM allocation this process runs in: SLURM_NTASKS, else `scontrol show job` (Snakemake's
    SLURM job step strips SLURM_NTASKS from a job's environment); None outside SLURM."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    tasks = env.get("SLURM_NTASKS", "")
    if tasks.isdigit():
        return int(tasks)
    if not shutil.which("scontrol"):
        return None
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=False)
    found = re.search(r"\bNumTasks=(\d+)", out.stdout)
    return int(found.group(1)) if out.returncode == 0 and found else None


def launch_mode(world: int, options: DeployOptions, env: Mapping[str, str]) -> str:
    """sbatch when asked (even for one stage: it runs on the planned device), else inprocess (one stage),
    srun (inside a SLURM allocation with enough tasks) or torchrun."""
    if options.launcher == "sbatch":
        return "sbatch"
    if world == 1:
        return "inprocess"
    if options.launcher != "auto":
        return options.launcher
    tasks = allocation_tasks(env)
    return "srun" if tasks is not None and tasks >= world else "torchrun"


def launch_command(mode: str, world: int, job_path: Path, env: Mapping[str, str],
                   module: str = STAGE_MODULE) -> tuple[list[str], dict[str, str]]:
    """The command that starts `world` processes of the stage entry point `module`, and its environment."""
    child = {**STAGE_ENV, **env}
    stage = [sys.executable, "-m", module, str(job_path)]
    if mode == "srun":
        child.setdefault("MASTER_ADDR", first_slurm_node(env))
        child.setdefault("MASTER_PORT", str(free_port()))
        return ["srun", "--kill-on-bad-exit=1", "-n", str(world), *stage], child
    if mode == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                f"--nproc-per-node={world}", "--max-restarts=0", "-m", module, str(job_path)], child
    raise ValueError(f"unknown launch mode {mode!r}")


def _run(cmd: list[str], env: dict[str, str], watch: Callable[[], None] | None = None, every_s: float = 5.0) -> int:
    """Run the stage launcher `cmd` to its end; `watch()` every `every_s` seconds meanwhile. The launcher's
    children do not get this process's console descriptor (`llmpq.progress`): torchrun closes it, and a number
    left in the environment could name another file there."""
    child = {k: v for k, v in env.items() if k != PROGRESS_FD_ENV}
    proc = subprocess.Popen(cmd, env=child)
    try:
        while True:
            try:
                return proc.wait(timeout=every_s if watch is not None else None)
            except subprocess.TimeoutExpired:
                watch()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def _remove_outputs(out: Path) -> None:
    for p in (out, tokens_path(out)):
        p.unlink(missing_ok=True)


def build_job(exp: Experiment, plan: Plan, specs: Sequence[StageSpec], weights: Path, quant_root: Path,
              workdir: Path, options: DeployOptions) -> RunJob:
    """The job of a checked plan: its stages, the workload's prompts, where the weights are, the options."""
    return RunJob(
        method=plan.method, model_dir=str(weights.resolve()), quant_root=str(quant_root.resolve()),
        scheme=plan.quant_scheme, prompts=tuple(tuple(p) for p in sample_prompts_for(exp, weights, options.seed)),
        gen_len=exp.workload.gen_len, micro_batch_prefill=plan.micro_batch_prefill,
        micro_batch_decode=plan.micro_batch_decode, stages=tuple(specs), workdir=str(workdir.resolve()),
        backend="gloo" if specs[0].kind == "cpu" else "nccl", timeout_s=options.timeout_s,
        record_logits=options.record_logits, fault=options.fault, verify=options.verify, warmup=options.warmup,
        kernel_needs=kernel_needs(exp.kernels, (k for s in specs for _, k in s.kernels)),
        dtype=run_dtype(plan, specs), repeats=options.repeats)


def run_dtype(plan: Plan, specs: Sequence[StageSpec]) -> str:
    """The plan's dtype; for a plan that records none, what the runtime computed in before: float32 on CPUs,
    float16 on GPUs."""
    if plan.dtype is not None:
        return plan.dtype
    return "float32" if specs[0].kind == "cpu" else "float16"


def run_job(job: RunJob, mode: str, slurm_job: SlurmJob | None = None) -> list[StageReport]:
    """Run every stage of `job` (in this process, or as `mode` processes, or as `slurm_job` for sbatch); their
    reports in stage order."""
    if mode == "inprocess":
        return [run_stage(job, Placement(0, 1, 0), init_dist=False)]
    world = len(job.stages)
    if mode == "sbatch":
        if slurm_job is None:
            raise ValueError("launcher sbatch needs the plan's SLURM job (slurm_layout)")
        try:
            code = run_on_slurm(job, slurm_job, [sys.executable, "-m", STAGE_MODULE])
        except SubmitError as exc:
            raise DeployError(str(exc)) from None
    else:
        cmd, env = launch_command(mode, world, job.write(Path(job.workdir) / "job.json"), os.environ)
        code = _run(cmd, env)
    if code != 0:
        raise DeployError(f"{mode} exited with code {code}: a stage failed (see the stage errors above)")
    missing = [r for r in range(world) if not job.report_path(r).is_file()]
    if missing:
        raise DeployError(f"stages {missing} finished without a report")
    return [StageReport.read(job.report_path(r)) for r in range(world)]


def deploy(exp: Experiment, plan_path: str | Path, out: str | Path, options: DeployOptions | None = None,
           results: str | Path = "results") -> DeployResult:
    """Run the plan at `plan_path` and write its `runs` table to `out` (and the tokens sidecar beside it)."""
    from ..models.shape import shape_from_config
    from ..models.source import hf_config_dict, model_dir

    options = options or DeployOptions()
    exp = planning_experiment(exp)[0]
    out, plan_path = Path(out), Path(plan_path)
    plan = read_plan(plan_path)
    weights = model_dir(exp.model, results=results)
    if weights is None:
        raise FileNotFoundError(f"model {exp.model.name}: source {exp.model.source!r} is not a local directory "
                                "with weights")
    shape = shape_from_config(hf_config_dict(exp.model, results=results))
    check_plan(exp, plan, shape.num_layers, shape.max_positions, str(plan_path))
    specs = stage_specs(exp, plan, shape, Path(results))
    check_caps(specs)
    _remove_outputs(out)
    started_load = load_average()
    mode = launch_mode(len(specs), options, os.environ)
    slurm_job = None
    if mode == "torchrun":
        specs = [StageSpec(**{**vars(s), "cuda_index": i}) for s, i in zip(specs, cuda_assignment(specs))]
    elif mode == "sbatch":
        specs, slurm_job = slurm_layout(exp, plan, specs, "deploy")
    quant_root = paths.quant_dir(Path(results), exp.model.name, plan.quant_scheme, 16).parent
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.deploy-", dir=out.parent))
    try:
        job = build_job(exp, plan, specs, weights, quant_root, workdir, options)
        reports = run_job(job, mode, slurm_job)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows, data = run_rows(job, plan, reports), sidecar(job, reports)
    write_sidecar(data, out)
    meta = provenance(exp.config_hash, device=",".join(s.device for s in specs), plan=str(plan_path), launcher=mode,
                      options=vars(options), **started_load)
    write_table("runs", rows, out, meta)
    return DeployResult(out, rows, data)


def summary(result: DeployResult) -> str:
    """One line: measured vs predicted per phase and throughput."""
    by_phase = {r["phase"]: r for r in result.rows}
    p, d = by_phase["prefill"], by_phase["decode"]
    first = result.rows[0]
    factors = [r["load_factor"] for r in result.rows if r["load_factor"] == r["load_factor"]]
    loaded = max(factors, default=float("nan"))
    note = (f"; machine loaded: idle reference {loaded:.2f}x the profile's, timings not comparable"
            if is_loaded(loaded) else "")
    return (f"{result.out}: {len(result.rows) // 2} stage(s), prefill {p['wall_ms']:.1f} ms "
            f"[{p['wall_ms_min']:.1f}-{p['wall_ms_max']:.1f}] (predicted {p['predicted_ms']:.1f}), decode "
            f"{d['wall_ms']:.1f} ms [{d['wall_ms_min']:.1f}-{d['wall_ms_max']:.1f}] (predicted {d['predicted_ms']:.1f}), "
            f"{first['throughput_tok_s']:.1f} tok/s (predicted {first['predicted_throughput_tok_s']:.1f}){note}")


def cli_deploy(exp: Experiment, args: Any) -> int:
    """`llmpq deploy [plan=PATH] [out=PATH]`: run the plan (default: the solver's plan) and write its runs table."""
    results = Path(args.results)
    key = (results, exp.model.name, exp.cluster.name, exp.workload.name, exp.solver.name)
    plan_path = args.plan or paths.plan_path(*key)
    out = args.out or paths.run_path(*key)
    infeasible = infeasible_record(plan_path)
    if infeasible is not None:  # a method that cannot fit: an empty runs table, the workflow goes on
        print(write_skipped("deploy", infeasible, {"runs": Path(out)}, config_hash=exp.config_hash))
        return 0
    options = DeployOptions.from_raw(exp.raw.get("deploy"))
    try:
        with console_bar(total=1, desc=f"deploy {Path(plan_path).stem} ({exp.model.name} on {exp.cluster.name})",
                         unit="plans", disable=True) as progress:
            result = deploy(exp, plan_path, out, options, results)
            progress.update(1)
    except StageRefusal as exc:
        print(f"llmpq deploy: {exc}", file=sys.stderr)
        return 3
    except DeployError as exc:
        print(f"llmpq deploy: error: {exc}; no runs table written", file=sys.stderr)
        return 1
    print(summary(result))
    return 0

