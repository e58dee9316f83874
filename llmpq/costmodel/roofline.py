"""Roofline latency from the device config: max(bytes moved / (bandwidth·eff), FLOPs / (peak·eff)).

Used for devices without a profile and, scaled to the nearest profiled point, outside a profile's grid.
Every function takes scalars or numpy arrays (batch, tokens, context) and broadcasts.
Weight-only quantized kernels (8/4/3/2 bits) compute in the 16-bit dtype: they move fewer weight bytes
but are bounded by the fp16 peak (`int8_tops` is the W8A8 peak, which no kernel here uses). A CPU
device's `fp16_tflops` is one core's fp32 FMA rate, so its peak scales with `threads`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmpq.config import DeviceSpec, QuantSpec
from llmpq.models.shape import ModelShape

from .memory import FP32_BYTES, dtype_bytes, layer_weight_bytes

PHASES = ("prefill", "decode")


def peak_flops(device: DeviceSpec) -> float:
    """P: peak FLOP/s = fp16_tflops · 1e12 (· threads on a CPU device)."""
    cores = (device.threads or 1) if device.kind == "cpu" else 1
    return device.fp16_tflops * 1e12 * cores


def efficiency(device: DeviceSpec, phase: str) -> float:
    """η_phase: the fraction of the roofline a real kernel reaches in `phase` (device config)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r} (known: {', '.join(PHASES)})")
    return device.efficiency.prefill if phase == "prefill" else device.efficiency.decode


def roofline_ms(flops: float, nbytes: float, device: DeviceSpec, phase: str) -> float:
    """T = max(bytes / (BW · η), FLOPs / (P · η)) · 1e3 (ms), BW in GB/s = 1e9 B/s."""
    eta = efficiency(device, phase)
    memory_s = nbytes / (device.mem_bandwidth_gbps * 1e9 * eta)
    compute_s = flops / (peak_flops(device) * eta)
    return np.maximum(memory_s, compute_s) * 1e3


@dataclass(frozen=True)
class LayerRoofline:
    """The roofline of one decoder layer at fixed (shape, bits, device), its constants precomputed.

    weight_bytes = W(bits); linear_params = Σ in·out; io_width = Σ (in + out); kv_width = 2·kv_heads·head_dim;
    attn_width = heads·head_dim; d = bytes of the 16-bit dtype.
    """

    device: DeviceSpec
    weight_bytes: float
    linear_params: float
    io_width: float
    kv_width: float
    attn_width: float
    d: int

    @staticmethod
    def of(shape: ModelShape, bits: int, quant: QuantSpec, device: DeviceSpec) -> "LayerRoofline":
        linears = shape.layer.linears
        return LayerRoofline(device, float(layer_weight_bytes(shape, bits, quant, device)),
                             float(sum(lin.weight_params for lin in linears)),
                             float(sum(lin.in_features + lin.out_features for lin in linears)),
                             float(2 * shape.kv_dim), float(shape.heads * shape.head_dim), dtype_bytes(device))

    def flops(self, batch, q_tokens, context_len):
        """F_layer = 2·b·q·Σ(in·out) + 4·b·q·c·heads·head_dim (QKᵀ and PV) (FLOPs)."""
        return batch * q_tokens * (2.0 * self.linear_params + 4.0 * context_len * self.attn_width)

    def bytes_moved(self, batch, q_tokens, context_len):
        """M_layer = W(bits) + d·b·q·Σ(in + out) + d·b·(c + q)·2·kv_heads·head_dim (bytes).

        Weights once, every linear's input and output, the KV cache read over the context and written for
        the new tokens.
        """
        return self.weight_bytes + self.d * batch * (q_tokens * self.io_width + (context_len + q_tokens) * self.kv_width)

    def ms(self, phase: str, batch, q_tokens, context_len):
        """Roofline time of the layer (ms)."""
        return roofline_ms(self.flops(batch, q_tokens, context_len), self.bytes_moved(batch, q_tokens, context_len),
                           self.device, phase)


def layer_flops(shape: ModelShape, batch: int, q_tokens: int, context_len: int) -> float:
    """F_layer = 2·b·q·Σ_linears(in·out) + 4·b·q·c·heads·head_dim (QKᵀ and PV) (FLOPs)."""
    linear = sum(lin.weight_params for lin in shape.layer.linears)
    return batch * q_tokens * (2.0 * linear + 4.0 * context_len * shape.heads * shape.head_dim)


def layer_bytes_moved(shape: ModelShape, bits: int, quant: QuantSpec, device: DeviceSpec, batch: int,
                      q_tokens: int, context_len: int) -> float:
    """M_layer = W(bits) + d·b·q·Σ_linears(in + out) + d·b·(c + q)·2·kv_heads·head_dim (bytes) (`LayerRoofline`)."""
    return LayerRoofline.of(shape, bits, quant, device).bytes_moved(batch, q_tokens, context_len)


def layer_roofline_ms(shape: ModelShape, bits: int, quant: QuantSpec, device: DeviceSpec, phase: str, batch: int,
                      q_tokens: int, context_len: int) -> float:
    """Roofline time of one decoder layer (ms)."""
    return LayerRoofline.of(shape, bits, quant, device).ms(phase, batch, q_tokens, context_len)


def embed_roofline_ms(shape: ModelShape, device: DeviceSpec, phase: str, batch: int, q_tokens: int) -> float:
    """Embedding lookup: M = 3·b·q·hidden·d (token row, position row, output) bytes, no FLOPs (ms)."""
    return roofline_ms(0.0 * batch, 3.0 * batch * q_tokens * shape.hidden * dtype_bytes(device), device, phase)


def head_roofline_ms(shape: ModelShape, device: DeviceSpec, phase: str, batch: int) -> float:
    """LM head on the last position + greedy sampling (ms).

    F = 2·b·vocab·hidden; M = vocab·hidden·d + b·hidden·d + b·vocab·4 (matrix, input, fp32 logits).
    """
    d = dtype_bytes(device)
    flops = 2.0 * batch * shape.vocab * shape.hidden
    nbytes = shape.vocab * shape.hidden * d + batch * shape.hidden * d + batch * shape.vocab * FP32_BYTES
    return roofline_ms(flops, nbytes, device, phase)
