"""A plan's stages as one SLURM job: one component per plan node and device request, one task per stage.

Stages whose devices ask SLURM for the same thing (GRES type, partition, constraint) on the same plan node form
one component (`--nodes=1`, one task per stage, the component's GRES count on that node); components are
ordered by their first stage, and each component's tasks by stage, so stage 0 is task 0 of component 0 (where
the torch.distributed rendezvous is). One component is a plain job; several are a heterogeneous job
(`#SBATCH hetjob`) started by one `srun --het-group=0-K`. SLURM numbers the tasks of such a step component
after component, so `task_stages` maps a task's rank to its stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ..config.types import DeviceSpec
from ..solve.plan import Plan
from .request import DeviceRequest, device_request
from .resources import SlurmOptions, job_minutes, stage_host_mib
from .site import SiteSettings


@dataclass(frozen=True)
class Component:
    """One component of the job: stages of one device request on one plan node (task k runs `stages[k]`)."""

    index: int
    node: str                       # the plan's node name
    devices: tuple[str, ...]        # device stems of its stages (several only where they ask for the same)
    stages: tuple[int, ...]
    request: DeviceRequest
    cpus_per_task: int
    mem_mb: int                     # for the whole component (its tasks share one node)

    @property
    def tasks(self) -> int:
        return len(self.stages)

    def sbatch_options(self, time_min: int, account: str | None) -> list[str]:
        """This component's `#SBATCH` options."""
        out = [f"--partition={self.request.partition}"] if self.request.partition else []
        out += [f"--account={account}"] if account else []
        out += [f"--time={time_min}", "--nodes=1", f"--ntasks={self.tasks}", f"--cpus-per-task={self.cpus_per_task}",
                f"--mem={self.mem_mb}M"]
        gres = self.request.gres_for(self.tasks)
        out += [f"--gres={gres}"] if gres else []
        out += [f"--constraint={self.request.constraint}"] if self.request.constraint else []
        return out

    def describe(self) -> str:
        """One line: its stages, devices and plan node, and what it asks of SLURM (`sbatch` short options)."""
        gres = self.request.gres_for(self.tasks)
        out = [f"[{self.index}] stages {','.join(map(str, self.stages))} {'+'.join(self.devices)}@{self.node}"]
        out += [f"-p {self.request.partition}"] if self.request.partition else []
        out += [f"-n{self.tasks}", f"-c{self.cpus_per_task}", f"--mem={self.mem_mb}M"]
        out += [f"--gres={gres}"] if gres else []
        out += [f"-C {self.request.constraint}"] if self.request.constraint else []
        return " ".join(out)


@dataclass(frozen=True)
class SlurmJob:
    """The SLURM job of one plan run: its name, components, wall time and account."""

    name: str
    components: tuple[Component, ...]
    time_min: int
    account: str | None = None

    @property
    def heterogeneous(self) -> bool:
        return len(self.components) > 1

    @property
    def tasks(self) -> int:
        return sum(c.tasks for c in self.components)

    def task_stages(self) -> tuple[int, ...]:
        """The stage each task of the step runs, by the task's rank (SLURM_PROCID)."""
        return tuple(s for c in self.components for s in c.stages)

    def component_of(self, stage: int) -> Component:
        return next(c for c in self.components if stage in c.stages)

    def summary(self) -> str:
        """One line for a dry run: the kind of job, its wall time, and each component."""
        kind = f"heterogeneous job of {len(self.components)} components" if self.heterogeneous else "job"
        return "; ".join([f"{kind}, {self.tasks} tasks, --time={self.time_min}"]
                         + [c.describe() for c in self.components])


def stage_components(stages: Sequence[tuple[str, str]], requests: Mapping[str, DeviceRequest]) -> list[list[int]]:
    """Stage indices grouped by (plan node, device request), groups in order of their first stage."""
    groups: dict[tuple[str, DeviceRequest], list[int]] = {}
    for j, (device, node) in enumerate(stages):
        groups.setdefault((node, requests[device]), []).append(j)
    return list(groups.values())


def plan_job(plan: Plan, devices: Mapping[str, DeviceSpec], name: str, options: SlurmOptions | None = None,
             site: SiteSettings | None = None) -> SlurmJob:
    """The SLURM job that runs `plan` on its devices (their `slurm:` blocks), with memory and time from the plan."""
    options = options or SlurmOptions()
    site = site or SiteSettings.from_env()
    stems = {s.device for s in plan.stages}
    missing = sorted(stems - set(devices))
    if missing:
        raise ValueError(f"plan devices {missing} have no device config")
    requests = {d: device_request(devices[d].slurm, site) for d in stems}
    components = []
    for k, group in enumerate(stage_components([(s.device, s.node) for s in plan.stages], requests)):
        stems_here = tuple(dict.fromkeys(plan.stages[j].device for j in group))
        components.append(Component(
            index=k, node=plan.stages[group[0]].node, devices=stems_here, stages=tuple(group),
            request=requests[stems_here[0]],
            cpus_per_task=max(devices[d].threads or 1 for d in stems_here),
            mem_mb=sum(stage_host_mib(plan.stages[j], devices[plan.stages[j].device], options) for j in group)))
    return SlurmJob(name=name, components=tuple(components), time_min=job_minutes(plan, options), account=site.account)
