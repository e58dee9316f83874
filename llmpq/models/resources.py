"""What the heavy rules ask a scheduler for (`resources:` mem_mb, runtime), from the model's shape alone.

No torch: the Snakefile calls these while it builds the DAG. The quality stages run layer by layer in
float32 (`quantize.stream`), so their memory is the embedding (and head), a few copies of one decoder
layer, and the calibration or eval windows' hidden states, never the whole model:

- import_model (a GGUF dequantized in one piece): 2 · P · 4 bytes (the model and its save);
- quantize (GPTQ): E + 3 · W_layer + Σ_linears in² · 4 (one Hessian per linear) + X_cal · (2 + ffn/hidden);
- calibrate: E + 2 · W_layer + 3 · X_cal (+ H + the reference log-probs n·s·V·4 for kl / loss_delta);
- ppl_map, evaluate (perplexity): E + H + 2 · W_layer + X_eval · 2 + one batch of logits 8 · w · V · 4
  + the dequantized layers kept for later plans (at most `DENSE_CACHE_GIB`);

with P parameters, E / H the embedding / head at 4 bytes per parameter, W_layer one layer's parameters
· 4, X = windows · tokens · hidden · 4, plus `BASE_MB` for the interpreter, torch, transformers and
GPTQModel, and a 25 % margin. Runtime (minutes) is a deliberately generous estimate: the matmul FLOPs
(2 per parameter per token per pass) at `CPU_GFLOPS` or `GPU_TFLOPS`, plus for GPTQ per linear the larger
of its solve (2 · in² · out FLOPs) and its column loop (`GPTQ_COLUMN_S` per input column; measured on
SmolLM2: 0.16 s for a 576-column linear), `SAFETY` times over, plus start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .dims import ModelShape

FP32 = 4
MIB = 1 << 20
BASE_MB = 1500            # python + torch + transformers + GPTQModel resident before any tensor (measured ~1.2 GB)
MARGIN = 1.25
CPU_GFLOPS = 20.0         # sustained float32 matmul throughput of one loaded CPU core
GPU_TFLOPS = 10.0         # sustained float32 throughput of a data-centre GPU, conservatively
GPTQ_COLUMN_S = 5e-4      # GPTQ's per-column work outside the matmuls (a Python loop over blocks of columns)
SAFETY = 4.0              # runtime = SAFETY × estimate + STARTUP_MIN
STARTUP_MIN = 5
LOGIT_BATCH = 8
DENSE_CACHE_GIB = 1.0     # llmpq.evaluate.perplexity.DENSE_CACHE_GIB (not imported: that module imports torch)
QUANTIZED_BITS = (8, 4, 3, 2)


@dataclass(frozen=True)
class RuleResources:
    """A rule's request: memory (MiB), wall time (minutes) and GPUs."""

    mem_mb: int
    runtime: int
    gpu: int = 0


def _mb(nbytes: float) -> int:
    return int(math.ceil((BASE_MB * MIB + nbytes * MARGIN) / MIB))


def _rate(gpu: bool) -> float:
    return GPU_TFLOPS * 1e12 if gpu else CPU_GFLOPS * 1e9


def _minutes(flops: float, gpu: bool, extra_s: float = 0.0) -> int:
    return int(math.ceil(SAFETY * (flops / _rate(gpu) + extra_s) / 60)) + STARTUP_MIN


def _layer_bytes(shape: ModelShape) -> int:
    return shape.layer.params * FP32


def _embed_bytes(shape: ModelShape) -> int:
    return shape.embed_params * FP32


def _head_bytes(shape: ModelShape) -> int:
    return (shape.head_params + shape.final_norm_params) * FP32


def _hessian_bytes(shape: ModelShape) -> int:
    return sum(lin.in_features ** 2 for lin in shape.layer.linears) * FP32


def import_resources(shape: ModelShape) -> RuleResources:
    """import_model: the whole model in float32, twice (load and save)."""
    return RuleResources(_mb(2 * shape.params * FP32), _minutes(shape.params * 10, gpu=False))


def quantize_resources(shape: ModelShape, samples: int, seq_len: int, gpu: bool = False) -> RuleResources:
    """quantize at one bit-width (GPTQ): two passes of every layer over the calibration tokens, one GPTQ
    solve per linear."""
    tokens = samples * seq_len
    hidden_states = tokens * shape.hidden * FP32
    memory = (_embed_bytes(shape) + 3 * _layer_bytes(shape) + _hessian_bytes(shape)
              + hidden_states * (2 + shape.ffn / shape.hidden))
    solve_s = sum(max(2 * lin.in_features ** 2 * lin.out_features / _rate(gpu), lin.in_features * GPTQ_COLUMN_S)
                  for lin in shape.layer.linears)
    flops = shape.num_layers * 2 * 2 * shape.layer.params * tokens
    return RuleResources(_mb(memory), _minutes(flops, gpu, shape.num_layers * solve_s), int(gpu))


def calibrate_resources(shape: ModelShape, samples: int, seq_len: int, low_bits: int, end_to_end: bool = False,
                        gpu: bool = False, end_to_end_samples: int | None = None) -> RuleResources:
    """calibrate: the unquantized layer and each stored bit-width on the calibration tokens; kl and
    loss_delta also run the rest of the model and the head after every (layer, bits), O(L²), on
    `end_to_end_samples` windows (default all)."""
    tokens = samples * seq_len
    hidden_states = tokens * shape.hidden * FP32
    memory = _embed_bytes(shape) + 2 * _layer_bytes(shape) + 3 * hidden_states
    flops = 2 * shape.layer.params * tokens * shape.num_layers * (1 + low_bits)
    if end_to_end:
        e2e_tokens = min(samples, end_to_end_samples or samples) * seq_len
        memory += _head_bytes(shape) + e2e_tokens * shape.vocab * FP32 * 2 + low_bits * e2e_tokens * shape.hidden * FP32
        runs = low_bits * shape.num_layers * (shape.num_layers - 1) // 2
        heads = low_bits * shape.num_layers
        flops += 2 * e2e_tokens * (shape.layer.params * runs + shape.head_params * heads)
    return RuleResources(_mb(memory), _minutes(flops, gpu), int(gpu))


def perplexity_resources(shape: ModelShape, windows: int, window: int, evaluations: int,
                         gpu: bool = False) -> RuleResources:
    """ppl_map / evaluate: `evaluations` full passes over the eval windows, one layer at a time."""
    tokens = windows * window
    cache = min(DENSE_CACHE_GIB * 1024**3, shape.num_layers * len(QUANTIZED_BITS) * _layer_bytes(shape))
    memory = (_embed_bytes(shape) + _head_bytes(shape) + 2 * _layer_bytes(shape) + 2 * tokens * shape.hidden * FP32
              + LOGIT_BATCH * window * shape.vocab * FP32 + cache)
    flops = evaluations * 2 * (shape.num_layers * shape.layer.params + shape.head_params) * tokens
    return RuleResources(_mb(memory), _minutes(flops, gpu), int(gpu))
