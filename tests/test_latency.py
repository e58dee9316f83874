"""Latency model: fit on a profile grid, monotone and non-negative, roofline fallback and continuity."""

from __future__ import annotations

import numpy as np
import pytest

from llmpq.artifacts import write_table
from llmpq.config import QuantSpec, load_device
from llmpq.costmodel.latency import build_latency_model
from llmpq.costmodel.roofline import layer_roofline_ms
from llmpq.models.shape import shape_from_config

SMALL_OPT = {"model_type": "opt", "hidden_size": 256, "ffn_dim": 1024, "num_hidden_layers": 4,
             "num_attention_heads": 4, "vocab_size": 1000, "max_position_embeddings": 512,
             "word_embed_proj_dim": 256, "do_layer_norm_before": True, "enable_bias": True}
OPT_30B = {"model_type": "opt", "hidden_size": 7168, "ffn_dim": 28672, "num_hidden_layers": 48,
           "num_attention_heads": 56, "vocab_size": 50272, "max_position_embeddings": 2048,
           "word_embed_proj_dim": 7168, "do_layer_norm_before": True, "enable_bias": True}
BATCHES = (1, 2, 4, 8)
LENGTHS = (16, 32, 64, 128)
Q = QuantSpec()


def bilinear(b, length, bits):
    """A latency surface the bilinear fit reproduces exactly: α + β·b + γ·L + δ·b·L (ms)."""
    scale = 1.0 if bits == 16 else 1.5
    return scale * (0.3 + 0.02 * b + 0.001 * length + 0.004 * b * length)


def profile_rows(device="cpu", noise=0.0, seed=0, bits=(16, 4)):
    rng = np.random.default_rng(seed)
    rows = []

    def add(component, b_, phase, batch, q, c, ms):
        ms = ms * (1 + noise * rng.standard_normal())
        kernel = "fp16" if b_ == 16 else "torch"
        rows.append({"device": device, "model": "m", "component": component, "bits": b_, "kernel": kernel,
                     "phase": phase,
                     "batch": batch, "q_tokens": q, "context_len": c, "latency_ms": ms, "latency_ms_p10": ms,
                     "latency_ms_p90": ms, "repeats": 3})
    for b_ in bits:
        for batch in BATCHES:
            for length in LENGTHS:
                add("layer", b_, "prefill", batch, length, length, 4 * bilinear(batch, length, b_))
                add("layer", b_, "decode", batch, 1, length, bilinear(batch, length, b_))
    for batch in BATCHES:
        for length in LENGTHS:
            add("embed", 16, "prefill", batch, length, length, 0.01 + 1e-5 * batch * length)
        add("embed", 16, "decode", batch, 1, 1, 0.01)
        for phase in ("prefill", "decode"):
            add("head", 16, phase, batch, 1, 1, 0.05 + 0.01 * batch)
    return rows


@pytest.fixture(scope="module")
def devices():
    return {stem: load_device(stem) for stem in ("cpu", "t4", "v100-32g")}


@pytest.fixture()
def model(tmp_path, devices):
    path = write_table("profile", profile_rows(), tmp_path / "cpu.parquet")
    return build_latency_model(shape_from_config(SMALL_OPT), devices, Q, {"cpu": path})


def test_sources(model):
    assert model.source("cpu") == "profile"
    assert model.source("t4") == "roofline"
    with pytest.raises(KeyError):
        model.source("h100")


def test_exact_on_grid_and_bilinear_between(model):
    for b, length in [(1, 16), (8, 128), (3, 48), (6, 100), (1, 77), (5, 16)]:
        assert model.layer_ms("cpu", 16, "decode", b, 1, length) == pytest.approx(bilinear(b, length, 16))
        assert model.layer_ms("cpu", 4, "prefill", b, length, length) == pytest.approx(4 * bilinear(b, length, 4))
    assert model.head_ms("cpu", "decode", 3) == pytest.approx(0.08)
    assert model.embed_ms("cpu", "prefill", 2, 24) == pytest.approx(0.01 + 1e-5 * 48)


def test_never_negative_and_monotone_dense_sweep(tmp_path, devices):
    """With noisy (non-monotone) measurements, inside and outside the grid, every bit-width and phase."""
    path = write_table("profile", profile_rows(noise=0.3, seed=3), tmp_path / "cpu.parquet")
    model = build_latency_model(shape_from_config(SMALL_OPT), devices, Q, {"cpu": path})
    rng = np.random.default_rng(0)
    for device in ("cpu", "t4"):
        for bits in (16, 8, 4, 3):
            for phase in ("prefill", "decode"):
                def t(b, length):
                    q = length if phase == "prefill" else 1
                    return model.layer_ms(device, bits, phase, int(b), q, int(length))
                for _ in range(60):
                    b = rng.integers(1, 40)
                    length = rng.integers(1, 400)
                    v = t(b, length)
                    assert v >= 0
                    assert t(b + rng.integers(1, 8), length) >= v - 1e-12
                    assert t(b, length + rng.integers(1, 64)) >= v - 1e-12
    for b in range(1, 40):
        assert model.head_ms("cpu", "decode", b + 1) >= model.head_ms("cpu", "decode", b) >= 0
        assert model.embed_ms("cpu", "prefill", b + 1, 20) >= model.embed_ms("cpu", "prefill", b, 20) >= 0


def test_unprofiled_device_is_the_roofline(model, devices):
    shape = shape_from_config(SMALL_OPT)
    for b, length in [(1, 16), (8, 512), (32, 1000)]:
        expected = layer_roofline_ms(shape, 4, Q, devices["t4"], "decode", b, 1, length)
        assert model.layer_ms("t4", 4, "decode", b, 1, length) == pytest.approx(expected)


def test_cpu_fit_never_applies_to_gpus(tmp_path, devices):
    """A CPU profile changes CPU numbers only; the GPU keeps its config's roofline."""
    shape = shape_from_config(SMALL_OPT)
    path = write_table("profile", profile_rows(), tmp_path / "cpu.parquet")
    with_cpu = build_latency_model(shape, devices, Q, {"cpu": path})
    without = build_latency_model(shape, devices, Q, {})
    for args in [(16, "prefill", 4, 64, 64), (4, "decode", 8, 1, 300)]:
        assert with_cpu.layer_ms("t4", *args) == without.layer_ms("t4", *args)
        assert with_cpu.layer_ms("cpu", *args) != without.layer_ms("cpu", *args)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_continuous_at_grid_edges(model, phase):
    """Stepping just across the grid's edge (either axis, either side) changes nothing."""
    def t(b, length):
        q = length if phase == "prefill" else 1
        return model.layer_ms_many("cpu", 16, phase, b, q, np.asarray([float(length)]))[0]
    for b, length in [(8, 40), (8, 128), (1, 128), (3, 128), (3, 16), (1, 16), (8, 16)]:
        for db, dl in [(1e-6, 0), (0, 1e-6), (0, -1e-6), (1e-6, 1e-6)]:
            assert t(b + db, length + dl) == pytest.approx(t(b, length), rel=1e-5)


def test_outside_grid_follows_roofline_growth(model, devices):
    """Beyond the grid the fit grows like the roofline, anchored at the nearest profiled point."""
    shape = shape_from_config(SMALL_OPT)
    cpu = devices["cpu"]
    anchor = model.layer_ms("cpu", 16, "decode", 8, 1, 128)
    roof = [layer_roofline_ms(shape, 16, Q, cpu, "decode", 8, 1, c) for c in (128, 512)]
    assert model.layer_ms("cpu", 16, "decode", 8, 1, 512) == pytest.approx(anchor * roof[1] / roof[0])


def test_missing_bits_scale_the_nearest_profiled(model, devices):
    """8 bits is not in the profile: the 4-bit fit (nearest) times the roofline ratio 8-bit / 4-bit."""
    shape = shape_from_config(SMALL_OPT)
    cpu = devices["cpu"]
    r8 = layer_roofline_ms(shape, 8, Q, cpu, "decode", 2, 1, 64)
    r4 = layer_roofline_ms(shape, 4, Q, cpu, "decode", 2, 1, 64)
    assert model.layer_ms("cpu", 8, "decode", 2, 1, 64) == pytest.approx(bilinear(2, 64, 4) * r8 / r4)


def test_prefill_over_a_longer_context_costs_more(model):
    """Prefill keyed by (batch, q); a context beyond the new tokens scales by the roofline's ratio."""
    plain = model.layer_ms("cpu", 16, "prefill", 2, 32, 32)
    assert model.layer_ms("cpu", 16, "prefill", 2, 32, 96) > plain


def test_non_rectangular_profile_is_refused(tmp_path, devices):
    rows = [r for r in profile_rows() if not (r["component"] == "layer" and r["batch"] == 2 and r["q_tokens"] == 32)]
    path = write_table("profile", rows, tmp_path / "cpu.parquet")
    with pytest.raises(ValueError, match="not rectangular"):
        build_latency_model(shape_from_config(SMALL_OPT), devices, Q, {"cpu": path})


@pytest.mark.parametrize("stem,phase,paper_ms", [
    ("t4", "decode", 7.8), ("v100-32g", "decode", 3.2), ("t4", "prefill", 263.0), ("v100-32g", "prefill", 75.6)])
def test_roofline_matches_paper_opt30b_layer(devices, stem, phase, paper_ms):
    """One OPT-30B layer, fp16, b = 8, s = 512 (decode: one token over 512 keys): the paper's measurements."""
    shape = shape_from_config(OPT_30B)
    q = 512 if phase == "prefill" else 1
    ms = layer_roofline_ms(shape, 16, Q, devices[stem], phase, 8, q, 512)
    assert ms == pytest.approx(paper_ms, rel=0.15)
