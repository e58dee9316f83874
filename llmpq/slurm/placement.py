"""Inside a task of a plan's SLURM step: which component and stage it is, and whether SLURM put it where planned.

SLURM numbers the tasks of a heterogeneous step component after component (SLURM_PROCID), and tells each task
the size of every component (SLURM_NTASKS_HET_GROUP_k), its node (SLURMD_NODENAME) and each component's
partition (SLURM_JOB_PARTITION_HET_GROUP_k) and job id (SLURM_JOB_ID_HET_GROUP_k; `scontrol show job -d`
lists the GRES it holds on each node). A plain job has one component and the variables without suffix.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping


@dataclass(frozen=True)
class TaskPlace:
    """Where SLURM started this task: its rank in the step, its component, its index there, its node."""

    rank: int
    component: int
    index: int
    node: str


@dataclass(frozen=True)
class PlannedPlace:
    """Where the plan's job put a stage: its component and that component's GRES (`gpu:typea`) and partition."""

    stage: int
    device: str
    component: int
    gres: str | None
    partition: str | None

    def describe(self) -> str:
        return (f"stage {self.stage} ({self.device}, component {self.component}, "
                f"gres {self.gres or 'none'}, partition {self.partition or '(default)'})")


def _component_var(env: Mapping[str, str], name: str, component: int) -> str | None:
    if "SLURM_HET_SIZE" in env:
        return env.get(f"{name}_HET_GROUP_{component}")
    return env.get(name)


def task_place(env: Mapping[str, str]) -> TaskPlace:
    """This task's rank, component, index in the component and node, from SLURM's step variables."""
    rank = int(env["SLURM_PROCID"])
    if "SLURM_HET_SIZE" in env:
        sizes = [int(env[f"SLURM_NTASKS_HET_GROUP_{k}"]) for k in range(int(env["SLURM_HET_SIZE"]))]
    else:
        sizes = [int(env.get("SLURM_NTASKS") or env["SLURM_NPROCS"])]
    first = 0
    for k, size in enumerate(sizes):
        if rank < first + size:
            return TaskPlace(rank, k, rank - first, env.get("SLURMD_NODENAME", ""))
        first += size
    raise ValueError(f"SLURM_PROCID {rank} is beyond the step's {first} tasks")


def node_gres(scontrol_job: str, node: str) -> list[str]:
    """GRES a job holds on `node` (`gpu:typea:2`), from `scontrol show job -d` text."""
    found = []
    for line in scontrol_job.splitlines():
        m = re.search(r"\bNodes=(\S+) .*\bGRES=(\S*)", line)
        if m and m.group(1) == node:
            found += [re.sub(r"\(.*?\)", "", g) for g in m.group(2).split(",") if g and g != "(null)"]
    return found


def scontrol_job(job_id: str) -> str:
    """`scontrol show job -d JOB` (empty where scontrol is missing or fails)."""
    if not shutil.which("scontrol"):
        return ""
    out = subprocess.run(["scontrol", "show", "job", "-d", job_id], capture_output=True, text=True, check=False)
    return out.stdout if out.returncode == 0 else ""


def placement_problem(planned: PlannedPlace, place: TaskPlace, env: Mapping[str, str],
                      show_job: Callable[[str], str] = scontrol_job) -> str | None:
    """Why this task is not where the plan's job put its stage (component, partition, GRES type), or None.

    The GRES check is skipped where `scontrol show job -d` cannot be asked.
    """
    where = f"runs in component {place.component} on node {place.node or '?'}"
    if place.component != planned.component:
        return f"{planned.describe()} {where}"
    partition = _component_var(env, "SLURM_JOB_PARTITION", place.component)
    if planned.partition and partition and partition != planned.partition:
        return f"{planned.describe()} {where} in partition {partition}"
    if planned.gres:
        job_id = _component_var(env, "SLURM_JOB_ID", place.component) or ""
        text = show_job(job_id) if job_id else ""
        held = node_gres(text, place.node)
        if text and not any(g == planned.gres or g.startswith(planned.gres + ":") for g in held):
            return f"{planned.describe()} {where} holding gres {','.join(held) or 'none'}"
    return None
