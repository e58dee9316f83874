"""Memory of a pipeline stage, in bytes: weights at their bits, KV cache, activations, embedding, head.

Shapes come from `ModelShape` (the model's HF config), never from a fixed OPT formula, so GQA and gated
MLPs count right. The 16-bit dtype is fp16 on a GPU and fp32 on a CPU (CPU stages compute in fp32); it
is the dtype of dense weights, norms, the embedding, the head, activations and the KV cache.

A stage's memory is `stage_fixed_memory` (what does not depend on which layers it holds) plus, for each
of its layers, `layer_weight_bytes + layer_kv_bytes`: linear in the layers, as the solver's MILP needs;
plus the workspace of its weight kernels (`kernel_workspace_bytes`, the largest of them: the MILP adds it
per stage through one variable). `stage_memory` is the one accounting of a stage: the solver's exact
score, deploy's cap check and the benchmarks all call it, with the kernels the plan records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from llmpq.config import DeviceSpec, KernelSpec, QuantSpec, WorkloadSpec
from llmpq.config.types import GIB
from llmpq.models.families import family
from llmpq.models.shape import LayerShape, LinearShape, ModelShape

INT32_BYTES = 4
FP16_BYTES = 2
FP32_BYTES = 4
TOKEN_ID_BYTES = 8          # int64 token ids on the return link
PACK_BITS = 32              # GPTQ packs codes into int32 words
QUANTIZED_SCHEMES = ("gptq", "rtn")
POSTED_MESSAGES = 2         # hidden-state receives a stage keeps posted, and sends it keeps in flight (runtime)


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


def gptq_linear_bytes(in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                      float_bytes: int = FP16_BYTES) -> int:
    """Bytes of one GPTQ-packed linear as a loaded module holds it (the checkpoint layout GPTQModel writes and loads).

    With G = ceil(in / group_size) groups (G = 1 for group_size <= 0, per channel):
    qweight int32 [ceil(in·bits/32), out] + qzeros int32 [G, ceil(out·bits/32)] + scales [G, out]
    + g_idx int32 [in] + bias [out], scales and bias in `float_bytes` (fp16 in the file; the module casts
    them to the compute dtype at load: fp32 on a CPU).
    """
    groups = math.ceil(in_features / group_size) if group_size > 0 else 1
    qweight = math.ceil(in_features * bits / PACK_BITS) * out_features * INT32_BYTES
    qzeros = groups * math.ceil(out_features * bits / PACK_BITS) * INT32_BYTES
    scales = groups * out_features * float_bytes
    g_idx = in_features * INT32_BYTES
    return qweight + qzeros + scales + g_idx + (out_features * float_bytes if bias else 0)


def linear_weight_bytes(linear: LinearShape, bits: int, quant: QuantSpec, device: DeviceSpec) -> int:
    """Bytes of one linear at `bits`: 16 = dense weight + bias in the 16-bit dtype, else the scheme's packing
    (scales and bias in the 16-bit dtype)."""
    if bits >= 16:
        return linear.params * dtype_bytes(device)
    if quant.scheme not in QUANTIZED_SCHEMES:
        raise ValueError(f"unknown quantization scheme {quant.scheme!r} (known: {', '.join(QUANTIZED_SCHEMES)})")
    return gptq_linear_bytes(linear.in_features, linear.out_features, linear.bias, bits, quant.group_size,
                             dtype_bytes(device))


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


def kernel_workspace_bytes(shape: ModelShape, device: DeviceSpec, kernels: Mapping[int, KernelSpec]) -> int:
    """W_k: the run-time workspace of a stage's weight kernels (bytes) = the largest over its (bits, kernel) pairs of

    - `per_call` (a kernel that dequantizes the whole weight on each call: torch, triton) and `persistent`
      (ExLlama's scratch, held for the run): max_linear(in·out) · bytes per weight (`workspace_bytes_per_weight`
      of the device kind: the 16-bit weight on a GPU, the measured peak of the eager dequantization on a CPU);
    - `repack` (Marlin) and `none` (the dense kernel): 0 at run time (see `load_workspace_bytes`).
    """
    largest = max(lin.weight_params for lin in shape.layer.linears)
    out = 0.0
    for bits, spec in kernels.items():
        if spec.workspace in ("per_call", "persistent"):
            out = max(out, largest * spec.workspace_bytes_per_weight.get(device.kind, dtype_bytes(device)))
    return int(math.ceil(out))


def load_workspace_bytes(shape: ModelShape, kernels: Mapping[int, KernelSpec]) -> int:
    """The load-time transient of kernels that repack their weight (Marlin): max_linear(in·out)·bits/8, the packed
    weight written once more while the old one is alive (bytes). It happens before the KV cache and activations
    exist, so it counts only where it exceeds them (`stage_memory`)."""
    largest = max(lin.weight_params for lin in shape.layer.linears)
    return int(math.ceil(max((largest * bits / 8 for bits, spec in kernels.items() if spec.workspace == "repack"),
                             default=0.0)))


def activations_bytes(shape: ModelShape, device: DeviceSpec, workload: WorkloadSpec, b_p: int, b_d: int,
                      *, scores_materialized: bool | None = None) -> int:
    """A_j: the activation peak of the larger phase at its own micro-batch (bytes).

    = max(A_peak(b_p, q=s, c=s), A_peak(b_d, q=1, c=s+n)); scores counted where the family's attention
    materializes them (`materializes_scores`), unless told otherwise.
    """
    if scores_materialized is None:
        scores_materialized = materializes_scores(shape)
    s, n = workload.longest_prompt, workload.gen_len
    prefill = activation_peak_bytes(shape, device, b_p, s, s, scores_materialized=scores_materialized)
    decode = activation_peak_bytes(shape, device, b_d, 1, s + n, scores_materialized=scores_materialized)
    return max(prefill, decode)


def buffers_bytes(shape: ModelShape, device: DeviceSpec, workload: WorkloadSpec, b_p: int, b_d: int,
                  *, first: bool, last: bool) -> int:
    """The message buffers the runtime holds on a stage (bytes); none for a one-stage pipeline (first and last).

    The runtime keeps at most P = 2 hidden-state receives posted and P sends in flight per phase
    (`POSTED_MESSAGES`), each b·q·hidden·d (prefill q = s, decode q = 1): hidden = max over the phases of
    min(K, P)·b·q·hidden·d, for the receiving end (every stage but the first) and the sending end (every
    stage but the last). The first stage keeps one token-id receive posted per micro-batch in flight:
    max(K_p·b_p, K_d·b_d)·8; the last keeps up to P token sends of b·8.
    """
    if first and last:
        return 0
    s, d = workload.longest_prompt, dtype_bytes(device)
    k_p, k_d = -(-workload.batch // b_p), -(-workload.batch // b_d)
    hidden = max(min(k_p, POSTED_MESSAGES) * b_p * s, min(k_d, POSTED_MESSAGES) * b_d) * shape.hidden * d
    recv = max(k_p * b_p, k_d * b_d) * TOKEN_ID_BYTES if first else hidden
    send = max(min(k_p, POSTED_MESSAGES) * b_p, min(k_d, POSTED_MESSAGES) * b_d) * TOKEN_ID_BYTES if last else hidden
    return recv + send


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


CUBLAS_WORKSPACE_BYTES_HOPPER = 4096 * 8 * 1024        # PyTorch's default on compute capability 9.x, 10.x, 12.x
CUBLAS_WORKSPACE_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8  # its default before (":4096:2:16:8")
CUBLAS_32MIB_MAJORS = (9, 10, 12)
CUDA_SMALL_BUFFERS_BYTES = 1024**2   # measured remainder on an H100 (benchmarks/results/gpu_check_h100_first.json)


def library_workspace_bytes(device: DeviceSpec) -> int:
    """W_lib: what a GPU stage process allocates besides its tensors (bytes); 0 on a CPU.

    = PyTorch's cuBLAS workspace, which cuBLASLt shares (torch's unified workspace, the default since 2.x;
    `CublasHandlePool.cpp`): 4096·8 KiB = 32 MiB on compute capability 9.x/10.x/12.x (Hopper, Blackwell),
    4096·2 KiB + 16·8 KiB = 8,519,680 B before (unknown capability: the smaller), one per device and stream
    + 1 MiB of small buffers and the allocator's rounding of every tensor to 512 bytes: what remained of the
    CUDA allocator's measured peak over the model's tensors on an H100 (36,244,992 B measured for tiny-opt's
    one-stage fp16 plan, 1,530,880 B of tensors predicted, 32 MiB of workspace). The CUDA context itself is
    outside the allocator and part of the device's `reserve_gib`.
    """
    if device.kind == "cpu":
        return 0
    major = int(device.compute_capability or 0)
    workspace = CUBLAS_WORKSPACE_BYTES_HOPPER if major in CUBLAS_32MIB_MAJORS else CUBLAS_WORKSPACE_BYTES
    return workspace + CUDA_SMALL_BUFFERS_BYTES


def stage_fixed_memory(shape: ModelShape, device: DeviceSpec, workload: WorkloadSpec, b_p: int, b_d: int, *,
                       first: bool, last: bool, head_on_first: bool = False,
                       scores_materialized: bool | None = None, workspace_bytes: int = 0) -> StageMemory:
    """The part of a stage's memory that does not depend on its layers (weights_bytes = kv_bytes = 0).

    Activations peak (larger phase) plus the kernels' workspace (`workspace_bytes`) and the libraries'
    per-process workspace on a GPU (`library_workspace_bytes`), both in `activations_bytes`;
    send/receive buffers, the embedding on the first stage, the LM head and last-position logits on the
    stage that runs it (the last, or the first with `head_on_first`), the device's reserve; capacity from
    the device.
    """
    runs_head = (first and head_on_first) or (last and not head_on_first)
    return StageMemory(
        weights_bytes=0,
        kv_bytes=0,
        activations_bytes=activations_bytes(shape, device, workload, b_p, b_d, scores_materialized=scores_materialized)
        + workspace_bytes + library_workspace_bytes(device),
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
                 b_d: int, quant: QuantSpec, *, first: bool, last: bool, kernels: Mapping[int, KernelSpec],
                 head_on_first: bool = False, scores_materialized: bool | None = None) -> StageMemory:
    """M_j = max(fixed + W_k + Σ_{i in stage} (W_i(b_i) + KV_i(K_d·b_d sequences, s + n)), load peak) (bytes).

    `kernels`: the weight kernel of each of the stage's bit-widths (for the run-time workspace W_k,
    `kernel_workspace_bytes`, counted in `activations_bytes`); the load peak is weights + embedding + head +
    reserve + the repacking transient (`load_workspace_bytes`), and where it exceeds the run-time total the
    difference is added to `activations_bytes` too. The one accounting of a stage (module docstring).
    """
    missing = sorted(b for b in set(bits) if b < 16 and b not in kernels)
    if missing:
        raise ValueError(f"stage_memory: no weight kernel given for bits {missing}")
    used = {b: kernels[b] for b in set(bits) if b < 16}
    fixed = stage_fixed_memory(shape, device, workload, b_p, b_d, first=first, last=last,
                               head_on_first=head_on_first, scores_materialized=scores_materialized,
                               workspace_bytes=kernel_workspace_bytes(shape, device, used))
    weights = sum(layer_weight_bytes(shape, b, quant, device) for b in bits)
    kv = len(bits) * layer_kv_bytes(shape, kv_sequences(workload, b_d), workload.kv_len, device)
    run = replace(fixed, weights_bytes=weights, kv_bytes=kv)
    load = weights + run.embed_bytes + run.head_bytes + run.reserve_bytes + load_workspace_bytes(shape, used)
    return replace(run, activations_bytes=run.activations_bytes + max(0, load - run.total_bytes))
