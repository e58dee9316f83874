"""Which weight kernels a model's layers may use on a device: the kernel table's menu for the model's shape and quantization.

`kernel_menu` is what the planner, the latency model, the memory model and the runtime ask: for each
bit-width the device offers, the kernels (table order) that can run a layer of this model there
(`KernelTable.menu` checks bits, device kind, compute capability, symmetry, group size and every linear's
alignment). A bit-width missing from the menu has no kernel there, so the planner never gives it to a layer
on that device. Restricting the menu further (an engine that runs fewer kernels) is a filter on its result.
"""

from __future__ import annotations

from llmpq.config import DeviceSpec, KernelTable, QuantSpec
from llmpq.models.shape import ModelShape

GPTQ_SYM = True  # the quantize stage writes symmetric GPTQ layers (`llmpq.quantize.settings.LinearQuant`)


def layer_linears(shape: ModelShape) -> tuple[tuple[int, int], ...]:
    """(in_features, out_features) of every linear of one decoder layer."""
    return tuple((lin.in_features, lin.out_features) for lin in shape.layer.linears)


def kernel_menu(table: KernelTable, device: DeviceSpec, quant: QuantSpec, shape: ModelShape) -> dict[int, tuple[str, ...]]:
    """bits -> the kernels that can run this model's layers at `bits` on `device`, in table order."""
    return table.menu(device, group_size=quant.group_size, sym=GPTQ_SYM, linears=layer_linears(shape))


def kernel_problem(table: KernelTable, name: str, device: DeviceSpec, bits: int, quant: QuantSpec,
                   shape: ModelShape) -> str | None:
    """Why kernel `name` cannot run this model's `bits`-bit layers on `device` (None when it can, and the device's
    `kernels:` override, if any, does not name another one)."""
    forced = dict(device.kernels).get(bits)
    if forced is not None and forced != name:
        return f"device {device.stem} runs {bits}-bit layers on {forced} (its config's kernels: override)"
    if bits not in device.bits:
        return f"device {device.stem} does not offer {bits}-bit layers (its bits: {list(device.bits)})"
    return table.unavailable(name, device, bits, group_size=quant.group_size, sym=GPTQ_SYM,
                             linears=layer_linears(shape))
