"""Each stage's planned memory (the cost model's, for the workload at hand) and the CPU memory cap check.

A CPU device config may declare `memory_cap_gib`; a stage whose planned memory exceeds it is refused
before anything is loaded, with the device and the numbers in the message. The planned memory is
`costmodel.memory.stage_memory` with the plan's kernels, the same total the solver compares with the
same capacity, so a plan the solver says fits is never refused here.
"""

from __future__ import annotations

from typing import Sequence

from ..config import Experiment, KernelTable, QuantSpec
from ..config.types import GIB
from ..costmodel.memory import StageMemory, stage_memory
from ..models.shape import ModelShape
from ..solve.plan import Plan
from .job import StageSpec

MIB = 1024**2


class StageRefusal(ValueError):
    """A stage that must not start: its plan asks for what its device cannot give (checked before loading)."""


class DeviceMismatch(StageRefusal):
    """A stage's GPU is not of the planned type, or there is none (checked before loading)."""


class MemoryCapError(StageRefusal):
    """A stage's planned memory exceeds its device's memory cap."""


def planned_memory(exp: Experiment, shape: ModelShape, plan: Plan, table: KernelTable) -> list[StageMemory]:
    """Memory of every stage of `plan` on its device for the experiment's workload, with the plan's kernels
    (`stage_memory`: the solver's own accounting)."""
    quant = QuantSpec(plan.quant_scheme, plan.quant_group_size)
    last = len(plan.stages) - 1
    return [stage_memory(shape, exp.devices[s.device], s.bits, exp.workload, plan.micro_batch_prefill,
                         plan.micro_batch_decode, quant, first=j == 0, last=j == last,
                         kernels={b: table.spec(k) for b, k in s.kernels})
            for j, s in enumerate(plan.stages)]


def cap_violation(stage: StageSpec) -> str | None:
    """Why `stage` may not start (its planned memory exceeds its device's cap), or None."""
    if stage.cap_bytes is None:
        return None
    need = stage.planned_total_bytes
    if need <= stage.cap_bytes:
        return None
    rest = need - stage.planned_weights_bytes - stage.planned_kv_bytes
    return (f"stage {stage.index} on device {stage.device}: planned weights "
            f"{stage.planned_weights_bytes / MIB:.2f} MiB + KV cache {stage.planned_kv_bytes / MIB:.2f} MiB "
            f"+ activations, workspace, buffers, embedding/head {rest / MIB:.2f} MiB "
            f"= {need / MIB:.2f} MiB exceed its memory_cap_gib {stage.cap_bytes / GIB:g} "
            f"({stage.cap_bytes / MIB:.2f} MiB)")


def check_caps(stages: Sequence[StageSpec]) -> None:
    """Raise MemoryCapError naming every stage whose planned memory exceeds its device's cap."""
    problems = [p for s in stages if (p := cap_violation(s)) is not None]
    if problems:
        raise MemoryCapError("refusing to deploy: " + "; ".join(problems))
