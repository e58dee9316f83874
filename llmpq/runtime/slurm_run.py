"""Run a job's stages as a plan's SLURM job (`deploy.launcher: sbatch`): what each stage's task must find, the
batch script, and the submission from the host that runs the workflow.

Used where the Snakemake SLURM executor runs the workflow: the rule that runs a plan stays on the submitting
host, writes the job on the shared file system, submits one job for all stages (heterogeneous when stages need
different device requests or plan nodes, `llmpq.slurm.hetjob`), streams its output and collects the stages'
reports like the other launchers. Any rule that runs a plan's pipeline can use it (`slurm_layout`, then
`run_on_slurm`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence, TextIO

from ..config import Experiment
from ..slurm.hetjob import SlurmJob, plan_job
from ..slurm.placement import PlannedPlace, placement_problem, task_place
from ..slurm.resources import SlurmOptions
from ..slurm.script import batch_script, job_name
from ..slurm.submit import describe_end, submit_and_wait
from ..solve.plan import Plan
from .job import RunJob, StageSpec


class PlacementError(RuntimeError):
    """A task of a plan's SLURM job is not where the job put its stage."""


def slurm_layout(exp: Experiment, plan: Plan, specs: Sequence[StageSpec], rule: str) -> tuple[list[StageSpec], SlurmJob]:
    """The plan's SLURM job (named after the rule and the experiment), and the stages with their components.

    A GPU stage uses the k-th GPU of its component's node, k its index there (each task of a component sees all
    of the component's GPUs).
    """
    name = job_name(rule, exp.model.name, exp.cluster.name, exp.workload.name, plan.method)
    job = plan_job(plan, exp.devices, name, SlurmOptions.from_raw(exp.raw.get("slurm")))
    out = []
    for s in specs:
        c = job.component_of(s.index)
        out.append(replace(s, component=c.index, slurm_gres=c.request.gres, slurm_partition=c.request.partition,
                           cuda_index=c.stages.index(s.index) if s.kind != "cpu" else None))
    return out, job


def slurm_stage(job: RunJob, env: Mapping[str, str]) -> tuple[int, int, str]:
    """(stage, index in its component, where it runs) of this task; PlacementError if SLURM put it elsewhere."""
    place = task_place(env)
    if place.rank >= len(job.task_stages):
        raise PlacementError(f"task {place.rank} of a job for {len(job.task_stages)} tasks")
    stage = job.task_stages[place.rank]
    spec = job.stages[stage]
    planned = PlannedPlace(stage, spec.device, spec.component if spec.component is not None else -1,
                           spec.slurm_gres, spec.slurm_partition)
    problem = placement_problem(planned, place, env)
    if problem is not None:
        raise PlacementError(problem)
    return stage, place.index, f"component {place.component} task {place.index} on node {place.node}"


def run_on_slurm(job: RunJob, slurm_job: SlurmJob, stage_command: Sequence[str], out: TextIO = sys.stdout) -> int:
    """Write the job and its batch script under the job's workdir, submit, stream, report; the job's exit status."""
    workdir = Path(job.workdir)
    job = replace(job, task_stages=slurm_job.task_stages())
    job_path = job.write(workdir / "job.json")
    script = workdir / "job.sbatch"
    output = workdir / "slurm.out"
    script.write_text(batch_script(slurm_job, [*stage_command, str(job_path)], output, Path(os.getcwd())))
    print(f"llmpq slurm: {slurm_job.summary()}", file=out, flush=True)
    end = submit_and_wait(script, output, len(slurm_job.components), out)
    for line in describe_end(slurm_job, end):
        print(line, file=out, flush=True)
    return end.returncode
