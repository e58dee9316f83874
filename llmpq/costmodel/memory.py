"""Memory of a pipeline stage, in bytes: weights at their bits, KV cache, activations, embedding, head.

Shapes come from `ModelShape` (the model's HF config), never from a fixed OPT formula, so GQA and gated
MLPs count right. The 16-bit dtype is fp16 on a GPU and fp32 on a CPU (CPU stages compute in fp32); it
is the dtype of dense weights, norms, the embedding, the head, activations and the KV cache.

A stage's memory is `stage_fixed_memory` (what does not depend on which layers it holds) plus, for each
of its layers, `layer_weight_bytes + layer_kv_bytes`: linear in the layers, as the solver's MILP needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from llmpq.config import DeviceSpec, QuantSpec, WorkloadSpec
from llmpq.config.types import GIB
from llmpq.models.families import family
from llmpq.models.shape import LayerShape, LinearShape, ModelShape

INT32_BYTES = 4
FP16_BYTES = 2
FP32_BYTES = 4
TOKEN_ID_BYTES = 8          # int64 token ids on the return link
PACK_BITS = 32              # GPTQ packs codes into int32 words
DEQUANT_BYTES_PER_PARAM = 8  # CPU weight-only kernels: fp16 dequantized copy + fp32 cast + int16 codes
QUANTIZED_SCHEMES = ("gptq", "rtn")


@dataclass(frozen=True)
class StageMemory:
    """Memory of one stage by part (bytes); `capacity_bytes` is what the device offers."""

    weights_bytes: int
    kv_bytes: int
    activations_bytes: int
    embed_bytes: int
    head_bytes: int
    buffers_bytes: int
    reserve_bytes: int
    capacity_bytes: int

    @property
    def total_bytes(self) -> int:
        """Everything the stage needs: all parts but the capacity."""
        return (self.weights_bytes + self.kv_bytes + self.activations_bytes + self.embed_bytes
                + self.head_bytes + self.buffers_bytes + self.reserve_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes


def dtype_bytes(device: DeviceSpec) -> int:
    """Bytes per element of the device's 16-bit dtype: fp16 (2) on a GPU, fp32 (4) on a CPU."""
    return FP32_BYTES if device.kind == "cpu" else FP16_BYTES


def capacity_bytes(device: DeviceSpec) -> int:
    """Memory the planner may use: a CPU device's `memory_cap_gib` if set, else `memory_gib` (bytes)."""
    gib = device.memory_cap_gib if device.kind == "cpu" and device.memory_cap_gib is not None else device.memory_gib
    return int(gib * GIB)


def gptq_linear_bytes(in_features: int, out_features: int, bias: bool, bits: int, group_size: int) -> int:
    """Bytes of one GPTQ-packed linear (the checkpoint layout GPTQModel writes and loads).

    With G = ceil(in / group_size) groups (G = 1 for group_size <= 0, per channel):
    qweight int32 [ceil(in·bits/32), out] + qzeros int32 [G, ceil(out·bits/32)] + scales fp16 [G, out]
    + g_idx int32 [in] + bias fp16 [out].
    """
    groups = math.ceil(in_features / group_size) if group_size > 0 else 1
    qweight = math.ceil(in_features * bits / PACK_BITS) * out_features * INT32_BYTES
    qzeros = groups * math.ceil(out_features * bits / PACK_BITS) * INT32_BYTES
    scales = groups * out_features * FP16_BYTES
    g_idx = in_features * INT32_BYTES
    return qweight + qzeros + scales + g_idx + (out_features * FP16_BYTES if bias else 0)


def linear_weight_bytes(linear: LinearShape, bits: int, quant: QuantSpec, device: DeviceSpec) -> int:
    """Bytes of one linear at `bits`: 16 = dense weight + bias in the 16-bit dtype, else the scheme's packing."""
    if bits >= 16:
        return linear.params * dtype_bytes(device)
    if quant.scheme not in QUANTIZED_SCHEMES:
        raise ValueError(f"unknown quantization scheme {quant.scheme!r} (known: {', '.join(QUANTIZED_SCHEMES)})")
    return gptq_linear_bytes(linear.in_features, linear.out_features, linear.bias, bits, quant.group_size)


def layer_weight_bytes(shape: ModelShape, bits: int, quant: QuantSpec, device: DeviceSpec) -> int:
    """W_i(b): all weights of one decoder layer at `bits` (bytes) = Σ_linears bytes(b) + norms · dtype.

    Both GPTQ and RTN layers are stored in the GPTQ packing (`gptq_linear_bytes`); norms stay 16-bit.
    """
    layer: LayerShape = shape.layer
    linears = sum(linear_weight_bytes(lin, bits, quant, device) for lin in layer.linears)
    return linears + layer.norm_params * dtype_bytes(device)


def layer_kv_bytes(shape: ModelShape, seqs: int, max_len: int, device: DeviceSpec) -> int:
    """KV_i: the preallocated KV cache of one layer (bytes) = 2 · seqs · max_len · kv_heads · head_dim · dtype."""
    return 2 * seqs * max_len * shape.kv_dim * dtype_bytes(device)


def materializes_scores(shape: ModelShape) -> bool:
    """Whether the family's attention holds b × heads × q × c scores (eager attention) rather than fusing them."""
    return family(shape.family).attention == "eager"


def _gated(shape: ModelShape) -> bool:
    return any(lin.name.endswith("gate_proj") for lin in shape.layer.linears)


def activation_peak_bytes(shape: ModelShape, device: DeviceSpec, batch: int, q_tokens: int, context_len: int,
                          *, scores_materialized: bool = False) -> int:
    """A_peak: the largest live set of one layer's forward for b sequences of q new tokens over context c (bytes).

    Attention block: residual + normed input (2·b·q·h) + q, k, v (b·q·(heads + 2·kv_heads)·head_dim)
    + attention output (b·q·heads·head_dim) [+ scores and probabilities 2·b·heads·q·c if the attention
    implementation materializes them]. MLP block: residual + normed input (2·b·q·h) + intermediates
    (2·b·q·ffn, 3 for gated MLPs) + output (b·q·h). Peak = dtype · max(attention, MLP).
    """
    tokens = batch * q_tokens
    hd = shape.head_dim
    attn = tokens * (2 * shape.hidden + (shape.heads + 2 * shape.kv_heads) * hd + shape.heads * hd)
    if scores_materialized:
        attn += 2 * batch * shape.heads * q_tokens * context_len
    mlp = tokens * (3 * shape.hidden + (3 if _gated(shape) else 2) * shape.ffn)
    return max(attn, mlp) * dtype_bytes(device)


def dequant_workspace_bytes(shape: ModelShape, device: DeviceSpec) -> int:
    """Scratch of CPU weight-only kernels, which dequantize a whole linear per call (bytes).

    = max_linear(in · out) · 8 on a CPU (fp16 dequantized weight, its fp32 cast, int16 codes); 0 on a GPU,
    whose kernels dequantize in registers.
    """
    if device.kind != "cpu":
        return 0
    return max(lin.weight_params for lin in shape.layer.linears) * DEQUANT_BYTES_PER_PARAM


def activations_bytes(shape: ModelShape, device: DeviceSpec, workload: WorkloadSpec, b_p: int, b_d: int,
                      *, scores_materialized: bool | None = None) -> int:
    """A_j: the activation peak of the larger phase at its own micro-batch, plus the dequant scratch (bytes).

    = max(A_peak(b_p, q=s, c=s), A_peak(b_d, q=1, c=s+n)) + dequant workspace; scores counted where the
    family's attention materializes them (`materializes_scores`), unless told otherwise.
    """
    if scores_materialized is None:
        scores_materialized = materializes_scores(shape)
    s, n = workload.prompt_len, workload.gen_len
    prefill = activation_peak_bytes(shape, device, b_p, s, s, scores_materialized=scores_materialized)
    decode = activation_peak_bytes(shape, device, b_d, 1, s + n, scores_materialized=scores_materialized)
    return max(prefill, decode) + dequant_workspace_bytes(shape, device)


def buffers_bytes(shape: ModelShape, device: DeviceSpec, workload: WorkloadSpec, b_p: int, b_d: int,
                  *, first: bool, last: bool) -> int:
    """Send + receive buffers of a stage (bytes), each sized for the larger phase.

    Hidden payload = max(b_p·s, b_d) · hidden · dtype; token ids = max(b_p, b_d) · 8. The first stage
    receives token ids (from the last), the last sends them; every other end moves hidden states.
    """
    hidden = max(b_p * workload.prompt_len, b_d) * shape.hidden * dtype_bytes(device)
    ids = max(b_p, b_d) * TOKEN_ID_BYTES
    return (ids if first else hidden) + (ids if last else hidden)


def embed_bytes(shape: ModelShape, device: DeviceSpec) -> int:
    """E: the embedding tables (token, positions, projections) in the 16-bit dtype (bytes)."""
    return shape.embed_params * dtype_bytes(device)


def head_bytes(shape: ModelShape, device: DeviceSpec, batch: int, *, with_embedding: bool) -> int:
    """H: final norm + LM head matrix + last-position fp32 logits (bytes).

    = (final_norm + vocab·hidden) · dtype + batch · vocab · 4; the matrix is not counted again where it is
    tied to an embedding held by the same stage.
    """
    matrix = 0 if shape.tied_head and with_embedding else shape.head_params
    return (shape.final_norm_params + matrix) * dtype_bytes(device) + batch * shape.vocab * FP32_BYTES


def stage_fixed_memory(shape: ModelShape, device: DeviceSpec, workload: WorkloadSpec, b_p: int, b_d: int, *,
                       first: bool, last: bool, head_on_first: bool = False,
                       scores_materialized: bool | None = None) -> StageMemory:
    """The part of a stage's memory that does not depend on its layers (weights_bytes = kv_bytes = 0).

    Activations peak (larger phase), send/receive buffers, the embedding on the first stage, the LM head
    and last-position logits on the stage that runs it (the last, or the first with `head_on_first`),
    the device's reserve; capacity from the device.
    """
    runs_head = (first and head_on_first) or (last and not head_on_first)
    return StageMemory(
        weights_bytes=0,
        kv_bytes=0,
        activations_bytes=activations_bytes(shape, device, workload, b_p, b_d, scores_materialized=scores_materialized),
        embed_bytes=embed_bytes(shape, device) if first else 0,
        head_bytes=head_bytes(shape, device, max(b_p, b_d), with_embedding=first) if runs_head else 0,
        buffers_bytes=buffers_bytes(shape, device, workload, b_p, b_d, first=first, last=last),
        reserve_bytes=device.reserve_bytes,
        capacity_bytes=capacity_bytes(device),
    )


def kv_sequences(workload: WorkloadSpec, b_d: int) -> int:
    """K_d · b_d: sequences the KV cache holds (B rounded up to whole decode micro-batches)."""
    return -(-workload.batch // b_d) * b_d


def stage_memory(shape: ModelShape, device: DeviceSpec, bits: Sequence[int], workload: WorkloadSpec, b_p: int,
                 b_d: int, quant: QuantSpec, *, first: bool, last: bool, head_on_first: bool = False,
                 scores_materialized: bool | None = None) -> StageMemory:
    """M_j = fixed + Σ_{i in stage} (W_i(b_i) + KV_i(K_d·b_d sequences, s + n)) (bytes)."""
    fixed = stage_fixed_memory(shape, device, workload, b_p, b_d, first=first, last=last,
                               head_on_first=head_on_first, scores_materialized=scores_materialized)
    weights = sum(layer_weight_bytes(shape, b, quant, device) for b in bits)
    kv = len(bits) * layer_kv_bytes(shape, kv_sequences(workload, b_d), workload.prompt_len + workload.gen_len, device)
    return replace(fixed, weights_bytes=weights, kv_bytes=kv)
