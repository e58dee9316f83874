"""Scheduler requests of the heavy rules from the model shape (no torch): hand-computed on a small shape,
and what a 70B model asks for (one layer plus activations, not the whole model)."""

import math

from llmpq.config import compose_experiment
from llmpq.models.families import family
from llmpq.models.resources import (BASE_MB, MARGIN, calibrate_resources, import_resources, perplexity_resources,
                                    quantize_resources)
from llmpq.models.source import model_shape

MIB = 1 << 20


def small_shape():
    """Llama-style: hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 100, untied."""
    return family("llama").shape({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 100})


def test_quantize_memory_by_hand():
    # layer: q 64·64, k 64·32, v 64·32, o 64·64, gate/up 64·128 each, down 128·64, 2 RMSNorms of 64
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 128 + 128 * 64 + 2 * 64
    hessians = 6 * 64 * 64 + 128 * 128          # every linear's in² (down reads 128 inputs)
    embed = 100 * 64
    tokens = 4 * 16
    memory = 4 * (embed + 3 * layer + hessians) + tokens * 64 * 4 * (2 + 128 / 64)
    got = quantize_resources(small_shape(), samples=4, seq_len=16)
    assert got.mem_mb == math.ceil((BASE_MB * MIB + memory * MARGIN) / MIB)
    assert got.gpu == 0 and got.runtime >= 5


def test_perplexity_and_calibrate_memory_by_hand():
    shape = small_shape()
    layer = shape.layer.params * 4
    dense_cache = 2 * 4 * layer                  # every (layer, bits < 16) dequantized: under the 1 GiB bound
    memory = 100 * 64 * 4 + (100 * 64 + 64) * 4 + 2 * layer + 2 * 3 * 32 * 64 * 4 + 8 * 32 * 100 * 4 + dense_cache
    assert perplexity_resources(shape, windows=3, window=32, evaluations=2).mem_mb == \
        math.ceil((BASE_MB * MIB + memory * MARGIN) / MIB)
    local = calibrate_resources(shape, samples=64, seq_len=128, low_bits=4)
    e2e = calibrate_resources(shape, samples=64, seq_len=128, low_bits=4, end_to_end=True)
    assert e2e.mem_mb > local.mem_mb and e2e.runtime >= local.runtime


def test_70b_asks_for_one_layer_not_the_model():
    shape = model_shape(compose_experiment(["model=llama-3.1-70b"]).model)
    whole_fp32_mb = shape.params * 4 / MIB
    quantize = quantize_resources(shape, samples=32, seq_len=128)
    # embedding 4.2 GB + three 3.4 GB layers + 4.9 GB of Hessians + activations, plus margin and base
    assert 20_000 < quantize.mem_mb < 40_000 < whole_fp32_mb / 5
    gpu = quantize_resources(shape, samples=32, seq_len=128, gpu=True)
    assert gpu.gpu == 1 and gpu.runtime < quantize.runtime and gpu.mem_mb == quantize.mem_mb
    assert import_resources(shape).mem_mb > 2 * whole_fp32_mb
    assert perplexity_resources(shape, 64, 128, 29).mem_mb < whole_fp32_mb / 10
