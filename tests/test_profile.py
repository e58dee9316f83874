"""Profiler: timing primitives, the grid, a real (tiny) layer profiled into a valid `profile` table."""

from __future__ import annotations

import pytest

from llmpq.artifacts import read_meta, read_table
from llmpq.config import QuantSpec, load_device
from llmpq.costmodel.latency import build_latency_model
from llmpq.models.shape import shape_from_config
from llmpq.profile.run import ProfileGrid, layer_fits, profile_to

TINY_OPT = {"model_type": "opt", "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 512, "max_position_embeddings": 64,
            "word_embed_proj_dim": 64, "do_layer_norm_before": True, "enable_bias": True}
TINY_GRID = ProfileGrid(batches=(1, 2), prompt_lens=(8, 16), contexts=(8, 16, 128), warmup=1, repeats=3,
                        min_time_ms=0, max_repeats=3)


def test_grid_from_config_and_cap():
    grid = ProfileGrid.from_config({"warmup": 1, "repeats": 4, "batches": [1, 4], "contexts": [16, 512]})
    assert grid.batches == (1, 4) and grid.repeats == 4 and grid.prompt_lens == ProfileGrid().prompt_lens
    assert grid.capped(256).contexts == (16, 256)
    assert grid.capped(1024).contexts == (16, 512)
    with pytest.raises(ValueError, match="unknown keys"):
        ProfileGrid.from_config({"repeat": 3})
    with pytest.raises(ValueError):
        ProfileGrid.from_config({"batches": []})


def test_measure_orders_spread():
    import torch

    from llmpq.profile.timing import measure

    t = measure(lambda: sum(range(2000)), warmup=1, repeats=7, device=torch.device("cpu"))
    assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms and t.repeats == 7


def test_thread_cpu_clock_needs_one_thread():
    import torch

    from llmpq.profile.timing import measure, torch_threads

    cpu = torch.device("cpu")
    with torch_threads(1):
        t = measure(lambda: sum(range(20000)), warmup=0, repeats=3, device=cpu, clock="thread_cpu")
        assert t.median_ms > 0
    with torch_threads(2), pytest.raises(ValueError, match="one torch thread"):
        measure(lambda: None, warmup=0, repeats=1, device=cpu, clock="thread_cpu")
    with pytest.raises(ValueError, match="unknown clock"):
        measure(lambda: None, warmup=0, repeats=1, device=cpu, clock="sundial")


def test_interleaved_passes_visit_every_point():
    import time

    import torch

    from llmpq.profile.timing import measure_interleaved

    calls, built, done = [0, 0, 0], [0, 0, 0], []

    def maker(i):
        built[i] += 1

        def call():
            calls[i] += 1
            if i == 2:
                time.sleep(0.002)
        return call

    timings = measure_interleaved([lambda i=i: maker(i) for i in range(3)], warmup=2, repeats=4, min_time_ms=10,
                                  max_repeats=9, device=torch.device("cpu"), on_done=done.append)
    # the two near-instant points run to max_repeats; the 2 ms one stops once 10 ms are timed (5 or 6 visits)
    assert built[:2] == [9, 9] and calls[:2] == [11, 11] and 5 <= built[2] <= 6 and calls[2] == built[2] + 2
    assert sum(done) == 3
    assert [t.repeats for t in timings] == built
    assert all(0 <= t.p10_ms <= t.median_ms <= t.p90_ms for t in timings)


def test_preallocated_cache_attends_over_context():
    import torch

    from llmpq.profile.timing import PreallocatedKV

    cache = PreallocatedKV(2, 3, 10, 4, torch.float32, torch.device("cpu"))
    cache.reset(6)
    k, v = cache.update(torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4), 0)
    assert k.shape == v.shape == (2, 3, 7, 4) and bool((k[:, :, 6] == 1).all())
    assert cache.nbytes == 2 * 2 * 3 * 10 * 4 * 4


def test_profile_tiny_layer_writes_valid_table(tmp_path):
    cpu = load_device("cpu")
    out = profile_to(tmp_path / "cpu" / "tiny.parquet", TINY_OPT, "tiny", cpu, QuantSpec(), TINY_GRID,
                     bits=(16,), progress=False)
    table = read_table("profile", out).to_pandas()
    layer = table[table.component == "layer"]
    # contexts are capped at the model's 64 positions: 128 -> 64
    assert sorted(set(layer[layer.phase == "decode"].context_len)) == [8, 16, 64]
    assert len(layer) == 2 * 2 + 2 * 3
    assert set(table.component) == {"layer", "embed", "head", "layer_hot", "layer_idle", "loop"}
    overheads = table[table.component.isin(["layer_hot", "layer_idle", "loop"])]
    assert (overheads.latency_ms >= 0).all() and (overheads.bits == 16).all()
    table = table[~table.component.isin(["loop"])]  # a loop cost may be measured as 0
    assert (table.latency_ms > 0).all()
    assert (table.latency_ms_p10 <= table.latency_ms).all() and (table.latency_ms <= table.latency_ms_p90).all()
    prefill = layer[layer.phase == "prefill"]
    assert (prefill.q_tokens == prefill.context_len).all()
    assert (layer[layer.phase == "decode"].q_tokens == 1).all()
    meta = read_meta(out)
    assert meta["device"] == "cpu" and "grid" in meta and meta["dtype"] == "float32"
    assert float(meta["reference_ms"]) > 0
    model = build_latency_model(shape_from_config(TINY_OPT), {"cpu": cpu}, QuantSpec(), {"cpu": out})
    assert model.source("cpu") == "profile" and model.overhead_source("cpu") == "profile"
    assert model.layer_ms("cpu", 16, "decode", 2, 1, 12) > 0
    corners = table[table.component == "layer_hot"]
    assert sorted(set(zip(corners.phase, corners.batch))) == [("decode", 1), ("decode", 2), ("prefill", 1),
                                                               ("prefill", 2)]
    loops = read_table("profile", out).to_pandas().query("component == 'loop'")
    assert sorted(zip(loops.phase, loops.batch)) == [("decode", 1), ("decode", 2), ("prefill", 1), ("prefill", 2)]
    for phase in ("prefill", "decode"):
        assert model.after_idle_ms("cpu", phase) >= 0.0
        assert model.loop_ms("cpu", phase, 2) >= 0.0 and model.loop_ms("cpu", phase, 64) == model.loop_ms("cpu", phase, 2)
    assert build_latency_model(shape_from_config(TINY_OPT), {"cpu": cpu}, QuantSpec(), {}).after_idle_ms("cpu", "decode") == 0


def test_big_layers_are_left_to_the_roofline():
    opt30b = {**TINY_OPT, "hidden_size": 7168, "ffn_dim": 28672, "num_attention_heads": 56,
              "word_embed_proj_dim": 7168, "max_position_embeddings": 2048}
    assert not layer_fits(shape_from_config(opt30b), load_device("cpu"), QuantSpec(), ProfileGrid())
    assert layer_fits(shape_from_config(TINY_OPT), load_device("cpu"), QuantSpec(), ProfileGrid())


@pytest.mark.slow
def test_profile_quantized_bits(tmp_path):
    """Quantized layers (GPTQModel TorchLinear, random codes) are timed at every requested bit-width."""
    cpu = load_device("cpu")
    grid = ProfileGrid(batches=(1, 2), prompt_lens=(8,), contexts=(8,), warmup=1, repeats=2, min_time_ms=0)
    out = profile_to(tmp_path / "q.parquet", TINY_OPT, "tiny", cpu, QuantSpec("gptq", 32), grid, bits=(8, 4, 3),
                     progress=False)
    table = read_table("profile", out).to_pandas()
    assert sorted(set(table[table.component == "layer"].bits)) == [3, 4, 8]


@pytest.mark.slow
def test_profile_llama_gqa_layer(tmp_path):
    """A GQA architecture profiles too (rotary position embeddings, fewer KV heads)."""
    llama = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64}
    grid = ProfileGrid(batches=(1, 2), prompt_lens=(8,), contexts=(8, 16), warmup=0, repeats=2, min_time_ms=0)
    out = profile_to(tmp_path / "l.parquet", llama, "llama", load_device("cpu"), QuantSpec(), grid, bits=(16,),
                     progress=False)
    assert len(read_table("profile", out)) > 0


@pytest.mark.slow
def test_profile_links_local(tmp_path):
    from llmpq.config import compose_experiment
    from llmpq.costmodel.context import read_links
    from llmpq.profile.links import profile_links_to

    exp = compose_experiment([])
    out = profile_links_to(tmp_path / "links.parquet", exp.cluster, exp.devices, payloads=(4096, 1 << 20), repeats=3)
    rows = read_table("links", out).to_pylist()
    assert sorted({(r["load"], r["payload_bytes"]) for r in rows}) == [
        ("busy", 4096), ("busy", 1 << 20), ("idle", 4096), ("idle", 1 << 20)]
    assert all(r["latency_ms"] >= 0 for r in rows)
    links = read_links(out)
    assert set(links) == {"intra_node"} and links["intra_node"].bandwidth_gbps > 0


def test_gpu_links_are_never_loopback_figures():
    """A GPU cluster's intra-node link is measured with NCCL only where two GPUs are visible; otherwise nothing is
    measured (the configured figures stay) and the reason says so."""
    from llmpq.config import compose_experiment
    from llmpq.profile.links import link_plan

    exp = compose_experiment(["model=opt-30b", "cluster=paper-c3"])
    backend, why = link_plan(exp.cluster, exp.devices, gpus=0)
    assert backend is None and "never filed for a GPU link" in why
    assert link_plan(exp.cluster, exp.devices, gpus=2)[0] == "nccl"
    cpu = compose_experiment([])
    assert link_plan(cpu.cluster, cpu.devices, gpus=0)[0] == "gloo"
