"""Roofline latency from the device config and the weight kernel: max(bytes / (bandwidth·η), FLOPs / (peak·η)) per part.

Used for devices without a profile and, scaled to the nearest profiled point, outside a profile's grid.
Every function takes scalars or numpy arrays (batch, tokens, context) and broadcasts. A layer is its
linears, each timed on the kernel that runs it (`linear_ms`, constants from `conf/kernels.yaml`: a fused
quantized GEMM reads fewer weight bytes but computes slower than the dense GEMM as rows grow; a kernel that
materialises the weight pays its dequantization on top of the dense GEMM), plus attention over the KV
cache. Weight-only kernels compute in the 16-bit dtype (`int8_tops` is the W8A8 peak, which no kernel
here uses). A CPU device's `fp16_tflops` is one core's fp32 FMA rate, so its peak scales with `threads`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmpq.config import DeviceSpec, KernelSpec, KernelTable, QuantSpec, default_kernel_table
from llmpq.models.shape import LinearShape, ModelShape

from .kernels import kernel_menu
from .memory import FP32_BYTES, dtype_bytes, linear_weight_bytes

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
class LinearCost:
    """One linear's constants: in (K) and out (N) features, its dense bytes (weight + bias in the 16-bit dtype) and
    its packed bytes at the layer's bits (`memory.linear_weight_bytes`; the dense bytes at 16 bits)."""

    k: float
    n: float
    dense_bytes: float
    packed_bytes: float

    @staticmethod
    def of(linear: LinearShape, bits: int, quant: QuantSpec, device: DeviceSpec) -> "LinearCost":
        d = dtype_bytes(device)
        return LinearCost(float(linear.in_features), float(linear.out_features), float(linear.params * d),
                          float(linear_weight_bytes(linear, bits, quant, device)))


def gemm_ms(device: DeviceSpec, phase: str, lin: LinearCost, rows, d: int):
    """The dense GEMM of one linear over `rows` = b·q rows (ms):
    max((d·K·N [+ bias] + d·rows·(K + N)) / (BW·η), 2·rows·K·N / (P·η))."""
    act = d * rows * (lin.k + lin.n)
    return roofline_ms(2.0 * rows * lin.k * lin.n, lin.dense_bytes + act, device, phase)


def linear_ms(kernel: KernelSpec, bits: int, device: DeviceSpec, phase: str, lin: LinearCost, rows, d: int):
    """t_kernel(rows) of one linear on one kernel (ms), rows = b·q (`KernelSpec` names the constants):

    - the dense kernel (16 bits): `gemm_ms`;
    - fused (rows ≤ R = fused_max_rows[bits]): max((packed / e + d·rows·(K + N)) / (BW·η),
      2·rows·K·N · s(rows) / (P·η)), e = bandwidth_efficiency[bits], s = compute_slowdown;
    - materialising (rows > R): (packed + p·d·K·N) / (BW·η) + `gemm_ms`: the packed weight read, the
      dequantized weight written (p = dequant_passes of the device kind), then read again by the dense GEMM.
    """
    rows = np.asarray(rows, dtype=float)
    dense = gemm_ms(device, phase, lin, rows, d)
    if bits >= 16:
        return dense
    eta = efficiency(device, phase)
    passes = kernel.dequant_passes.get(device.kind, 1.0)
    materialise = dense + (lin.packed_bytes + passes * d * lin.k * lin.n) / (device.mem_bandwidth_gbps * 1e9 * eta) * 1e3
    limit = kernel.fused_rows(bits)
    if limit <= 0:
        return materialise
    e = kernel.bandwidth_efficiency.get(bits, 1.0)
    fused = roofline_ms(2.0 * rows * lin.k * lin.n * kernel.slowdown(rows),
                        lin.packed_bytes / e + d * rows * (lin.k + lin.n), device, phase)
    return np.where(rows <= limit, fused, materialise)


@dataclass(frozen=True)
class LayerRoofline:
    """The roofline of one decoder layer at fixed (shape, bits, kernel, device), its constants precomputed.

    t_layer = Σ_linears `linear_ms`(kernel, rows = b·q) + attention, where attention is the roofline of
    F = 4·b·q·c·heads·head_dim (QKᵀ and PV) and M = d·b·(c + q)·2·kv_heads·head_dim + norms·d (the KV cache
    read over the context and written for the new tokens, the norm weights); d = bytes of the 16-bit dtype.
    """

    device: DeviceSpec
    kernel: KernelSpec
    bits: int
    linears: tuple[LinearCost, ...]
    norm_bytes: float
    kv_width: float
    attn_width: float
    d: int

    @staticmethod
    def of(shape: ModelShape, bits: int, quant: QuantSpec, device: DeviceSpec, kernel: KernelSpec) -> "LayerRoofline":
        d = dtype_bytes(device)
        linears = tuple(LinearCost.of(lin, bits, quant, device) for lin in shape.layer.linears)
        return LayerRoofline(device, kernel, bits, linears, float(shape.layer.norm_params * d), float(2 * shape.kv_dim),
                             float(shape.heads * shape.head_dim), d)

    def attention_ms(self, phase: str, batch, q_tokens, context_len):
        """Attention over the KV cache, and the norms (ms): see the class docstring."""
        flops = 4.0 * batch * q_tokens * context_len * self.attn_width
        nbytes = self.norm_bytes + self.d * batch * (context_len + q_tokens) * self.kv_width
        return roofline_ms(flops, nbytes, self.device, phase)

    def ms(self, phase: str, batch, q_tokens, context_len):
        """Roofline time of the layer (ms)."""
        rows = np.asarray(batch, dtype=float) * np.asarray(q_tokens, dtype=float)
        total = self.attention_ms(phase, batch, q_tokens, context_len)
        for lin in self.linears:
            total = total + linear_ms(self.kernel, self.bits, self.device, phase, lin, rows, self.d)
        return total


def kernel_ratio(kernel: KernelSpec, bits: int, device: DeviceSpec, linear: LinearShape, quant: QuantSpec, rows,
                 phase: str = "decode"):
    """t_kernel(rows) / t_fp16(rows) of one linear (dimensionless; the device's efficiency cancels out)."""
    d = dtype_bytes(device)
    cost = LinearCost.of(linear, bits, quant, device)
    dense = LinearCost.of(linear, 16, quant, device)
    return linear_ms(kernel, bits, device, phase, cost, rows, d) / gemm_ms(device, phase, dense, rows, d)


def layer_roofline_ms(shape: ModelShape, bits: int, quant: QuantSpec, device: DeviceSpec, phase: str, batch: int,
                      q_tokens: int, context_len: int, kernel: KernelSpec | None = None,
                      table: KernelTable | None = None) -> float:
    """Roofline time of one decoder layer (ms) on `kernel`; None: the fastest kernel of the device's menu for `bits`
    at this point (`table`, default the shipped one)."""
    if kernel is not None:
        return float(LayerRoofline.of(shape, bits, quant, device, kernel).ms(phase, batch, q_tokens, context_len))
    table = table or default_kernel_table()
    names = kernel_menu(table, device, quant, shape).get(bits)
    if not names:
        raise ValueError(f"device {device.stem} has no kernel for {bits}-bit layers")
    return min(float(LayerRoofline.of(shape, bits, quant, device, table.spec(n)).ms(phase, batch, q_tokens, context_len))
               for n in names)


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
