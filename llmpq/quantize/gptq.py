"""GPTQ layer by layer: one decoder layer in memory at a time, GPTQModel's GPTQ solver per linear.

For decoder layer i (`LayerStream.fp_layer`, read alone from the safetensors checkpoint):
1. run it on the calibration windows' hidden states X_i, while every linear accumulates its Hessian
   H = 2·Σ x xᵀ over all calibration tokens (GPTQModel 7.6's `GPTQ.add_batch`);
2. quantize each linear with GPTQ (`GPTQ.quantize`: column by column, compensating each column's rounding
   error on the columns not yet quantized through H⁻¹; per-group grid of `group_size` inputs,
   symmetric, damping 5 %, no activation reordering — the layout Marlin/ExLlama kernels read);
3. pack the result into the GPTQ checkpoint layout (`pack_linear`) and hand it to the store writer;
4. X_{i+1} = the quantized layer (rebuilt from its file) run on X_i, so that layer i+1 is calibrated on
   the activations it will see (GPTQ's sequential order), and free layer i.

Memory: the embedding + one layer in float32 + its Hessians (Σ in² · 4 bytes over its linears) + 2·X
(windows × seq × hidden · 4 bytes); the LM head is never loaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..models.shape import layer_linears
from .gptq_layout import GroupQuant, gptqmodel, pack_linear
from .settings import LinearQuant
from .stream import LayerStream

GPTQ_DAMP = 0.05          # GPTQModel 7.6's default damp_percent


@dataclass(frozen=True)
class QuantizedLayer:
    """The packed tensors of one layer's linears (relative names), their settings and the solve time."""

    index: int
    tensors: dict[str, torch.Tensor]
    settings: LinearQuant
    seconds: float


def gptq_solver(linear: torch.nn.Linear, q: LinearQuant):
    """GPTQModel's GPTQ solver for one linear at `q`'s settings (feed it inputs with `add_batch(x, None)`)."""
    lib = gptqmodel()
    from gptqmodel.quantization.gptq import GPTQ

    config = lib.QuantizeConfig(bits=q.bits, group_size=q.group_size, sym=q.sym, desc_act=q.desc_act,
                                damp_percent=GPTQ_DAMP, offload_to_disk=False)
    solver = GPTQ(linear, config)
    solver.quantizer.configure(perchannel=True)
    return solver


def solve_and_pack(solver, linear: torch.nn.Linear, q: LinearQuant) -> dict[str, torch.Tensor]:
    """Quantize `linear` with its fed solver: the packed v1 tensors of the result."""
    weight, scale, zero, g_idx = solver.quantize()[:4]
    grid = GroupQuant(scales=scale.float().cpu(), zeros=zero.round().to(torch.int32).cpu(),
                      g_idx=g_idx.to(torch.int32).cpu())
    bias = linear.bias.detach().cpu() if linear.bias is not None else None
    return pack_linear(weight.detach().float().cpu(), bias, grid, q)


def gptq_layers(stream: LayerStream, windows: torch.Tensor, q: LinearQuant,
                rebuild: Callable[[QuantizedLayer], torch.nn.Module]) -> Iterator[QuantizedLayer]:
    """Quantize every decoder layer of `stream` in order on calibration `windows` [n, seq] (module docstring).

    `rebuild(result)` must store the layer and return it as a module (the quantized layer the next
    layer's inputs come from); it is called before the next layer is loaded.
    """
    hidden = stream.embed(windows)
    for index in range(stream.num_layers):
        start = time.perf_counter()
        layer = stream.fp_layer(index)
        linears = layer_linears(layer)
        solvers = {name: gptq_solver(linear, q) for name, linear in linears.items()}
        hooks = [linear.register_forward_pre_hook(lambda m, args, name=name: solvers[name].add_batch(args[0], None))
                 for name, linear in linears.items()]
        try:
            stream.forward(layer, index, hidden)
        finally:
            for hook in hooks:
                hook.remove()
        tensors: dict[str, torch.Tensor] = {}
        for name, linear in linears.items():
            packed = solve_and_pack(solvers.pop(name), linear, q)
            tensors.update({f"{name}.{key}": value for key, value in packed.items()})
        del layer, linears
        result = QuantizedLayer(index, tensors, q, time.perf_counter() - start)
        quantized = rebuild(result)
        yield result
        hidden = stream.forward(quantized, index, hidden)
        del quantized
