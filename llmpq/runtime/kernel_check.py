"""Before a stage loads anything: the plan's weight kernels must run on the device that stage is given.

Two checks of one rule. The launcher checks every stage against the kernel table and the device configs
(`plan_kernel_problems`: bits, device kind, compute capability, group size, alignment; no device needed).
Each stage process then checks the torch device it was given (`stage_kernel_problem`: a CPU runs only
`fp16` and `torch`; a GPU must have the compute capability the kernel needs and GPTQModel's own runtime
check of the kernel's class must pass, which is GPU-only code). A problem names the stage, the first layer
at those bits, the bits, the kernel and the device; the stage is refused before it loads anything.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ..config import Experiment, KernelTable, QuantSpec
from ..costmodel.kernels import kernel_problem
from ..models.shape import ModelShape
from ..quantize.gptq_layout import GPU_KERNELS, qlinear_class
from ..solve.plan import Plan
from .caps import StageRefusal
from .job import KernelNeeds, StageSpec


class KernelUnavailable(StageRefusal):
    """A stage's planned weight kernel cannot run on its device."""


def _first_layer(start: int, bits: tuple[int, ...], b: int) -> int:
    return start + bits.index(b)


def refusal(stage: int, device: str, layer: int, bits: int, kernel: str, why: str) -> str:
    """The message of a refused kernel: stage, layer, bits, kernel, device and the reason."""
    return (f"stage {stage} on device {device}: layer {layer} ({bits} bits) is planned on kernel {kernel}, "
            f"which {device} cannot run: {why}")


def plan_kernel_problems(exp: Experiment, plan: Plan, shape: ModelShape) -> list[str]:
    """Every (stage, bits) whose planned kernel the kernel table says its device cannot run (empty: none)."""
    quant = QuantSpec(plan.quant_scheme, plan.quant_group_size)
    out = []
    for j, st in enumerate(plan.stages):
        for b, k in st.kernels:
            why = kernel_problem(exp.kernels, k, exp.devices[st.device], b, quant, shape)
            if why is not None:
                out.append(refusal(j, st.device, _first_layer(st.start, st.bits, b), b, k, why))
    return out


def kernel_needs(table: KernelTable, names: Iterable[str]) -> tuple[KernelNeeds, ...]:
    """What each named kernel needs of a device (the job carries it, so stage processes read no config)."""
    return tuple(KernelNeeds(n, table.spec(n).device_kinds, table.spec(n).min_compute_capability)
                 for n in sorted(set(names)))


def _device_problem(need: KernelNeeds, device: torch.device) -> str | None:
    kind = "gpu" if device.type == "cuda" else "cpu"
    if kind not in need.device_kinds:
        return f"{need.name} runs on {'/'.join(need.device_kinds)} devices only, this stage runs on {device.type}"
    if kind == "gpu":  # GPU only
        major, minor = torch.cuda.get_device_capability(device)
        have = major + minor / 10
        if need.min_compute_capability is not None and have + 1e-9 < need.min_compute_capability:
            return f"{need.name} needs compute capability >= {need.min_compute_capability:g}, {device} has {have:g}"
        if need.name in GPU_KERNELS:
            ok, err = qlinear_class(need.name).validate_once()
            if not ok:
                return f"GPTQModel cannot run {need.name} here: {err}"
    return None


def stage_kernel_problem(spec: StageSpec, device: torch.device, needs: Mapping[str, KernelNeeds]) -> str | None:
    """Why this process cannot run `spec`'s kernels on `device` (None when it can)."""
    for b, k in spec.kernels:
        need = needs.get(k)
        why = _device_problem(need, device) if need is not None else f"the job says nothing of kernel {k}"
        if why is not None:
            return refusal(spec.index, spec.device, _first_layer(spec.start, spec.bits, b), b, k, why)
    return None
