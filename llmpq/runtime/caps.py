"""Each stage's planned memory (the cost model's, for the workload at hand) and the CPU memory cap check.

A CPU device config may declare `memory_cap_gib`; a stage whose planned weights + KV cache exceed it is
refused before anything is loaded, with the device and the numbers in the message.
"""

from __future__ import annotations

from typing import Sequence

from ..config import Experiment, QuantSpec
from ..config.types import GIB
from ..costmodel.memory import StageMemory, stage_memory
from ..models.shape import ModelShape
from ..solve.plan import Plan
from .job import StageSpec

MIB = 1024**2


class MemoryCapError(ValueError):
    """A stage's planned weights + KV exceed its device's memory cap."""


def planned_memory(exp: Experiment, shape: ModelShape, plan: Plan) -> list[StageMemory]:
    """Memory of every stage of `plan` on its device for the experiment's workload (`stage_memory`)."""
    quant = QuantSpec(plan.quant_scheme, plan.quant_group_size)
    last = len(plan.stages) - 1
    return [stage_memory(shape, exp.devices[s.device], s.bits, exp.workload, plan.micro_batch_prefill,
                         plan.micro_batch_decode, quant, first=j == 0, last=j == last)
            for j, s in enumerate(plan.stages)]


def cap_violation(stage: StageSpec) -> str | None:
    """Why `stage` may not start (its planned weights + KV exceed its device's cap), or None."""
    if stage.cap_bytes is None:
        return None
    need = stage.planned_weights_bytes + stage.planned_kv_bytes
    if need <= stage.cap_bytes:
        return None
    return (f"stage {stage.index} on device {stage.device}: planned weights "
            f"{stage.planned_weights_bytes / MIB:.2f} MiB + KV cache {stage.planned_kv_bytes / MIB:.2f} MiB "
            f"= {need / MIB:.2f} MiB exceed its memory_cap_gib {stage.cap_bytes / GIB:g} "
            f"({stage.cap_bytes / MIB:.2f} MiB)")


def check_caps(stages: Sequence[StageSpec]) -> None:
    """Raise MemoryCapError naming every stage whose planned weights + KV exceed its device's cap."""
    problems = [p for s in stages if (p := cap_violation(s)) is not None]
    if problems:
        raise MemoryCapError("refusing to deploy: " + "; ".join(problems))
