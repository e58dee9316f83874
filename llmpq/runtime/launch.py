"""`llmpq deploy plan=PLAN [out=RUNS.parquet]`: run a plan with one process per stage and record what it measured.

The launcher checks the plan against the experiment and every stage's planned weights + KV against its
device's memory cap (before anything is loaded), samples the workload's prompts, writes the job every
stage reads, then starts the stages:

- one stage: in this process, without messages;
- inside a SLURM allocation of at least N tasks (SLURM_JOB_ID set; SLURM_NTASKS, or `scontrol show job`):
  `srun --kill-on-bad-exit=1 -n N python -m llmpq.runtime.stage JOB`, with MASTER_ADDR the first node of
  the allocation and a free MASTER_PORT;
- otherwise torchrun on this node (`python -m torch.distributed.run --standalone --nproc-per-node N -m
  llmpq.runtime.stage JOB`; it stops every worker as soon as one fails).

Stages talk over torch.distributed: gloo on CPUs, NCCL on GPUs. Options come from the config's optional
`deploy:` block (`DeployOptions`). The runs table and its tokens sidecar are written only after every
stage has succeeded, atomically; outputs of an earlier run are removed once the plan has passed its checks,
so a failed run leaves none.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import paths
from ..artifacts import provenance, write_table
from ..config import Experiment
from ..solve.plan import Plan, read_plan
from .caps import MemoryCapError, check_caps, planned_memory
from .job import RunJob, StageSpec
from .report import run_rows, sidecar, tokens_path, write_sidecar
from .schedule import Fault
from .stage import Placement, StageReport, run_stage

LAUNCHERS = ("auto", "torchrun", "srun")
STAGE_MODULE = "llmpq.runtime.stage"


class DeployError(RuntimeError):
    """A stage process failed, or the run did not produce every stage's report."""


@dataclass(frozen=True)
class DeployOptions:
    """The optional `deploy:` config block.

    timeout_s: how long a stage waits for a peer (process group timeout) before it fails.
    seed: which prompts are sampled from the workload's text. launcher: auto | torchrun | srun.
    record_logits: also keep the logits of the first and last generated tokens (in the tokens sidecar).
    fault: a test hook, RANK:ROUND:exit|hang (`llmpq.runtime.schedule.Fault`).
    verify: check every layer file's sha256 against its store's manifest before loading it.
    warmup: run untimed calls per phase and micro-batch size on each stage before the clocks start.
    """

    timeout_s: float = 60.0
    seed: int = 0
    launcher: str = "auto"
    record_logits: bool = False
    fault: str | None = None
    verify: bool = True
    warmup: bool = True

    def __post_init__(self) -> None:
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
                 "warmup": bool, "fault": lambda v: None if v is None else str(v)}
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
    need = exp.workload.prompt_len + exp.workload.gen_len
    if need > max_positions:
        raise ValueError(f"{where}: workload {exp.workload.name} needs {need} positions, model {exp.model.name} "
                         f"has {max_positions}")
    kinds = {exp.devices[s.device].kind for s in plan.stages}
    if len(kinds) > 1:
        raise ValueError(f"{where}: plan mixes CPU and GPU stages, which one process group cannot connect")


def cuda_assignment(specs: Sequence[StageSpec]) -> list[int | None]:
    """For a one-node GPU run: each stage's CUDA index, the first unused device with the stage's GPU name."""
    if all(s.kind == "cpu" for s in specs):
        return [None] * len(specs)
    import torch

    names = [torch.cuda.get_device_name(i).replace(" ", "_") for i in range(torch.cuda.device_count())]
    free = list(range(len(names)))
    out: list[int | None] = []
    for s in specs:
        match = next((i for i in free if names[i] == s.device_name), None)
        if match is None:
            raise ValueError(f"stage {s.index} needs a {s.device_name} ({s.device}); free GPUs here: "
                             f"{[names[i] for i in free] or 'none'}")
        free.remove(match)
        out.append(match)
    return out


def stage_specs(exp: Experiment, plan: Plan, shape: Any) -> list[StageSpec]:
    """Every stage of the plan with its device and planned memory."""
    memory = planned_memory(exp, shape, plan)
    specs = []
    for j, (s, mem) in enumerate(zip(plan.stages, memory)):
        dev = exp.devices[s.device]
        cap = int(dev.memory_cap_gib * 1024**3) if dev.kind == "cpu" and dev.memory_cap_gib is not None else None
        specs.append(StageSpec(j, s.device, s.node, dev.kind, dev.name, dev.threads, s.start, s.end, s.bits,
                               mem.weights_bytes, mem.kv_bytes, mem.total_bytes, mem.capacity_bytes, cap))
    return specs


def sample_prompts_for(exp: Experiment, model_dir: Path, seed: int) -> list[list[int]]:
    """B real prompts of s tokens from the workload's text source, tokenised with the model's tokenizer."""
    from transformers import AutoTokenizer

    from ..data.text import sample_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    w = exp.workload
    return sample_prompts(w.prompts, tokenizer, w.batch, w.prompt_len, seed=seed)


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
    """inprocess (one stage), srun (inside a SLURM allocation with enough tasks) or torchrun."""
    if world == 1:
        return "inprocess"
    if options.launcher != "auto":
        return options.launcher
    tasks = allocation_tasks(env)
    return "srun" if tasks is not None and tasks >= world else "torchrun"


def first_slurm_node(env: Mapping[str, str]) -> str:
    """The first host of the allocation (`scontrol show hostnames`), else this host."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts[0]
    return socket.gethostname()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def launch_command(mode: str, world: int, job_path: Path, env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command that starts `world` stage processes, and its environment."""
    child = dict(env)
    child.setdefault("OMP_NUM_THREADS", "1")
    stage = [sys.executable, "-m", STAGE_MODULE, str(job_path)]
    if mode == "srun":
        child.setdefault("MASTER_ADDR", first_slurm_node(env))
        child.setdefault("MASTER_PORT", str(free_port()))
        return ["srun", "--kill-on-bad-exit=1", "-n", str(world), *stage], child
    if mode == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                f"--nproc-per-node={world}", "--max-restarts=0", "-m", STAGE_MODULE, str(job_path)], child
    raise ValueError(f"unknown launch mode {mode!r}")


def _run(cmd: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
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
        record_logits=options.record_logits, fault=options.fault, verify=options.verify, warmup=options.warmup)


def run_job(job: RunJob, mode: str) -> list[StageReport]:
    """Run every stage of `job` (in this process, or as `mode` processes); their reports in stage order."""
    if mode == "inprocess":
        return [run_stage(job, Placement(0, 1, 0), init_dist=False)]
    world = len(job.stages)
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
    out, plan_path = Path(out), Path(plan_path)
    plan = read_plan(plan_path)
    weights = model_dir(exp.model, results=results)
    if weights is None:
        raise FileNotFoundError(f"model {exp.model.name}: source {exp.model.source!r} is not a local directory "
                                "with weights")
    shape = shape_from_config(hf_config_dict(exp.model, results=results))
    check_plan(exp, plan, shape.num_layers, shape.max_positions, str(plan_path))
    specs = stage_specs(exp, plan, shape)
    check_caps(specs)
    _remove_outputs(out)
    mode = launch_mode(len(specs), options, os.environ)
    if mode == "torchrun":
        specs = [StageSpec(**{**vars(s), "cuda_index": i}) for s, i in zip(specs, cuda_assignment(specs))]
    quant_root = paths.quant_dir(Path(results), exp.model.name, plan.quant_scheme, 16).parent
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.deploy-", dir=out.parent))
    try:
        job = build_job(exp, plan, specs, weights, quant_root, workdir, options)
        reports = run_job(job, mode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows, data = run_rows(job, plan, reports), sidecar(job, reports)
    write_sidecar(data, out)
    meta = provenance(exp.config_hash, device=",".join(s.device for s in specs), plan=str(plan_path), launcher=mode,
                      options=vars(options))
    write_table("runs", rows, out, meta)
    return DeployResult(out, rows, data)


def summary(result: DeployResult) -> str:
    """One line: measured vs predicted per phase and throughput."""
    by_phase = {r["phase"]: r for r in result.rows}
    p, d = by_phase["prefill"], by_phase["decode"]
    first = result.rows[0]
    return (f"{result.out}: {len(result.rows) // 2} stage(s), prefill {p['wall_ms']:.1f} ms "
            f"(predicted {p['predicted_ms']:.1f}), decode {d['wall_ms']:.1f} ms (predicted {d['predicted_ms']:.1f}), "
            f"{first['throughput_tok_s']:.1f} tok/s (predicted {first['predicted_throughput_tok_s']:.1f})")


def cli_deploy(exp: Experiment, args: Any) -> int:
    """`llmpq deploy [plan=PATH] [out=PATH]`: run the plan (default: the solver's plan) and write its runs table."""
    results = Path(args.results)
    key = (results, exp.model.name, exp.cluster.name, exp.workload.name, exp.solver.name)
    plan_path = args.plan or paths.plan_path(*key)
    out = args.out or paths.run_path(*key)
    options = DeployOptions.from_raw(exp.raw.get("deploy"))
    try:
        result = deploy(exp, plan_path, out, options, results)
    except MemoryCapError as exc:
        print(f"llmpq deploy: {exc}", file=sys.stderr)
        return 3
    except DeployError as exc:
        print(f"llmpq deploy: error: {exc}; no runs table written", file=sys.stderr)
        return 1
    print(summary(result))
    return 0

