"""Memory model: hand-counted layer and KV bytes, stage composition, capacity."""

from __future__ import annotations

import pytest

from llmpq.config import QuantSpec, WorkloadSpec, default_kernel_table, load_device
from llmpq.config.types import GIB
from llmpq.costmodel.memory import (
    gptq_linear_bytes,
    kernel_workspace_bytes,
    library_workspace_bytes,
    layer_kv_bytes,
    layer_weight_bytes,
    stage_fixed_memory,
    stage_memory,
)
from llmpq.models.shape import shape_from_config

OPT_30B = {"model_type": "opt", "hidden_size": 7168, "ffn_dim": 28672, "num_hidden_layers": 48,
           "num_attention_heads": 56, "vocab_size": 50272, "max_position_embeddings": 2048,
           "word_embed_proj_dim": 7168, "do_layer_norm_before": True, "enable_bias": True,
           "tie_word_embeddings": True}
# Llama-3-8B-like: GQA with 8 KV heads for 32 query heads
LLAMA_GQA = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "tie_word_embeddings": False}
G128 = QuantSpec("gptq", 128)
TABLE = default_kernel_table()
TORCH = {b: TABLE.spec("torch") for b in (8, 4, 3, 2)}  # every quantized bit-width on the generic kernel


@pytest.fixture(scope="module")
def t4():
    return load_device("t4")


@pytest.fixture(scope="module")
def cpu():
    return load_device("cpu")


def test_opt30b_layer_fp16_by_hand(t4, cpu):
    h, f = 7168, 28672
    # q, k, v, out_proj: h x h weight + h bias; fc1: h x f + f; fc2: f x h + h; two LayerNorms: 2 x 2h
    params = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
    assert params == 616_655_872
    shape = shape_from_config(OPT_30B)
    assert layer_weight_bytes(shape, 16, G128, t4) == params * 2 == 1_233_311_744   # fp16 on a GPU
    assert layer_weight_bytes(shape, 16, G128, cpu) == params * 4                   # fp32 on a CPU


def _attn_proj(bits):
    """One 7168 -> 7168 GPTQ linear, group 128: 56 groups."""
    qweight = (7168 * bits // 32) * 7168 * 4      # int32 [in*bits/32, out]
    qzeros = 56 * (7168 * bits // 32) * 4         # int32 [groups, out*bits/32]
    scales = 56 * 7168 * 2                        # fp16 [groups, out]
    g_idx = 7168 * 4                              # int32 [in]
    bias = 7168 * 2                               # fp16 [out]
    return qweight + qzeros + scales + g_idx + bias


def _fc1(bits):
    """7168 -> 28672, 56 groups."""
    return (7168 * bits // 32) * 28672 * 4 + 56 * (28672 * bits // 32) * 4 + 56 * 28672 * 2 + 7168 * 4 + 28672 * 2


def _fc2(bits):
    """28672 -> 7168, 224 groups."""
    return (28672 * bits // 32) * 7168 * 4 + 224 * (7168 * bits // 32) * 4 + 224 * 7168 * 2 + 28672 * 4 + 7168 * 2


@pytest.mark.parametrize("bits,expected", [(8, 631_457_792), (4, 320_768_000), (3, 243_095_552)])
def test_opt30b_layer_gptq_by_hand(t4, bits, expected):
    norms = 2 * 2 * 7168 * 2                      # two LayerNorms (weight + bias) in fp16
    by_hand = 4 * _attn_proj(bits) + _fc1(bits) + _fc2(bits) + norms
    assert by_hand == expected
    assert layer_weight_bytes(shape_from_config(OPT_30B), bits, G128, t4) == expected


def test_gptq_bytes_ceil_and_per_channel():
    # in 100 (not a multiple of 32) at 3 bits: ceil(300/32) = 10 packed rows; per-channel: one group
    assert gptq_linear_bytes(100, 64, False, 3, -1) == 10 * 64 * 4 + 1 * 6 * 4 + 1 * 64 * 2 + 100 * 4


def test_kv_bytes_mha_by_hand(t4):
    shape = shape_from_config(OPT_30B)  # 56 heads x 128 = 7168, MHA
    # B = 32 sequences at s + n = 512 + 100; 2 (K and V) x seqs x len x kv_heads x head_dim x fp16
    assert layer_kv_bytes(shape, 32, 612, t4) == 2 * 32 * 612 * 56 * 128 * 2 == 561_512_448


def test_kv_bytes_gqa_by_hand(t4, cpu):
    shape = shape_from_config(LLAMA_GQA)  # 8 KV heads x head_dim 128 = 1024 wide, not 4096
    assert shape.kv_dim == 1024
    assert layer_kv_bytes(shape, 4, 1000, t4) == 2 * 4 * 1000 * 8 * 128 * 2 == 16_384_000
    assert layer_kv_bytes(shape, 4, 1000, cpu) == 2 * 4 * 1000 * 8 * 128 * 4


def test_stage_memory_is_linear_in_layers(t4):
    shape = shape_from_config(OPT_30B)
    w = WorkloadSpec("w", prompt_len=512, gen_len=100, batch=32)
    bits = (16, 8, 4, 4, 3)
    fixed = stage_fixed_memory(shape, t4, w, 8, 16, first=False, last=False)
    kernels = {8: TABLE.spec("marlin"), 4: TABLE.spec("marlin"), 3: TABLE.spec("torch")}
    full = stage_memory(shape, t4, bits, w, 8, 16, G128, first=False, last=False, kernels=kernels)
    assert fixed.weights_bytes == fixed.kv_bytes == 0
    assert full.weights_bytes == sum(layer_weight_bytes(shape, b, G128, t4) for b in bits)
    assert full.kv_bytes == len(bits) * layer_kv_bytes(shape, 32, 612, t4)
    workspace = kernel_workspace_bytes(shape, t4, kernels)
    assert workspace == 7168 * 28672 * 2      # the 3-bit torch kernel's fp16 copy of fc1 (Marlin's repack: at load)
    assert full.total_bytes == fixed.total_bytes + workspace + full.weights_bytes + full.kv_bytes
    assert full.reserve_bytes == t4.reserve_bytes and full.capacity_bytes == int(t4.memory_gib * GIB)


def test_kv_rounds_batch_up_to_whole_micro_batches(t4):
    shape = shape_from_config(OPT_30B)
    w = WorkloadSpec("w", prompt_len=128, gen_len=16, batch=10)
    m = stage_memory(shape, t4, (4,), w, 4, 4, G128, first=False, last=False, kernels=TORCH)
    assert m.kv_bytes == layer_kv_bytes(shape, 12, 144, t4)   # K_d = 3 micro-batches of 4


def test_embedding_head_and_tied_matrix(t4):
    shape = shape_from_config(OPT_30B)
    w = WorkloadSpec("w", prompt_len=512, gen_len=100, batch=32)
    first = stage_fixed_memory(shape, t4, w, 8, 8, first=True, last=False)
    last = stage_fixed_memory(shape, t4, w, 8, 8, first=False, last=True)
    only = stage_fixed_memory(shape, t4, w, 8, 8, first=True, last=True)
    logits = 8 * 50272 * 4
    assert first.embed_bytes == shape.embed_params * 2 and first.head_bytes == 0
    assert last.embed_bytes == 0
    assert last.head_bytes == (2 * 7168 + 50272 * 7168) * 2 + logits    # tied head stored again on another stage
    assert only.head_bytes == 2 * 7168 * 2 + logits                     # tied and on the embedding's stage


def test_gated_mlp_and_materialised_scores_in_activations(t4):
    shape = shape_from_config(LLAMA_GQA)
    w = WorkloadSpec("w", prompt_len=256, gen_len=8, batch=4)
    plain = stage_fixed_memory(shape, t4, w, 4, 4, first=False, last=False)
    scores = stage_fixed_memory(shape, t4, w, 4, 4, first=False, last=False, scores_materialized=True)
    tokens = 4 * 256
    mlp = tokens * (3 * 4096 + 3 * 14336) * 2
    lib = library_workspace_bytes(t4)  # the cuBLAS workspace of a GPU process
    assert plain.activations_bytes == mlp + lib
    attn = (tokens * (2 * 4096 + (32 + 16) * 128 + 32 * 128) + 2 * 4 * 32 * 256 * 256) * 2
    assert scores.activations_bytes == max(mlp, attn) + lib


def test_cpu_capacity_uses_memory_cap():
    small = load_device("cpu-small")
    shape = shape_from_config(OPT_30B)
    m = stage_fixed_memory(shape, small, WorkloadSpec("w", 8, 2, 1), 1, 1, first=False, last=False)
    assert m.capacity_bytes == int(small.memory_cap_gib * GIB)
    assert not stage_memory(shape, small, (4,), WorkloadSpec("w", 8, 2, 1), 1, 1, G128, first=False, last=False,
                            kernels=TORCH).fits


@pytest.mark.slow
def test_gptq_bytes_match_gptqmodel_buffers(cpu):
    """The formula against GPTQModel's own TorchLinear buffers (built on meta: nothing allocated)."""
    import os

    import torch

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization import FORMAT

    for bits in (8, 4, 3, 2):
        for inf, outf, bias in ((1024, 4096, True), (4096, 1024, False), (768, 3072, True)):
            with torch.device("meta"):
                q = TorchLinear(bits=bits, group_size=128, sym=True, desc_act=False, in_features=inf,
                                out_features=outf, bias=bias, pack_dtype=torch.int32, register_buffers=True,
                                format=FORMAT.GPTQ)
            stored = sum(b.numel() * b.element_size() for n, b in q.named_buffers()
                         if n in ("qweight", "qzeros", "scales", "g_idx", "bias"))
            assert gptq_linear_bytes(inf, outf, bias, bits, 128) == stored


def test_library_workspace_per_device(t4, cpu):
    from llmpq.costmodel.memory import CUDA_SMALL_BUFFERS_BYTES

    assert library_workspace_bytes(cpu) == 0
    assert library_workspace_bytes(t4) == 4096 * 1024 * 2 + 16 * 1024 * 8 + CUDA_SMALL_BUFFERS_BYTES  # cc 7.5
    assert library_workspace_bytes(load_device("h100")) == 32 * 1024**2 + CUDA_SMALL_BUFFERS_BYTES     # cc 9.0
    w = WorkloadSpec("w", 16, 4, 2)
    shape = shape_from_config(OPT_30B)
    gpu, host = stage_fixed_memory(shape, t4, w, 1, 1, first=False, last=False), stage_fixed_memory(
        shape, cpu, w, 1, 1, first=False, last=False)
    assert gpu.activations_bytes - library_workspace_bytes(t4) == host.activations_bytes // 2  # fp16 vs fp32


def test_gpu_stage_memory_against_the_h100_measurement(tiny_opt_dir):
    """The one-stage fp16 tiny-opt plan deployed on an H100 (benchmarks/results/gpu_check_h100_first.json, the first
    run, which recorded the allocator's whole peak): that peak against the memory model's stage total without the
    device's reserve (the CUDA context, which the allocator does not see)."""
    import json
    from pathlib import Path

    fixture = json.loads((Path(__file__).parents[1] / "benchmarks/results/gpu_check_h100_first.json").read_text())
    measured = fixture["plans"]["fp16"]["measured_peak_bytes"]
    h100 = load_device("h100")
    shape = shape_from_config(json.loads((tiny_opt_dir / "config.json").read_text()))
    w = WorkloadSpec("s64-n16-b8", 64, 16, 8)
    m = stage_memory(shape, h100, (16,) * 4, w, 4, 8, G128, first=True, last=True, kernels={})
    predicted = m.total_bytes - m.reserve_bytes
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)
    without = predicted - library_workspace_bytes(h100)
    assert without == pytest.approx(fixture["plans"]["fp16"]["predicted_bytes"], rel=0.01)  # what was predicted then
