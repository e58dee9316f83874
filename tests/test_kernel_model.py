"""The weight-kernel table: limits from GPTQModel's classes, per-device menus, and the latency model against the
published points it cites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmpq.config import ConfigError, QuantSpec, compose_experiment, default_kernel_table, load_device
from llmpq.costmodel.kernels import kernel_menu
from llmpq.costmodel.roofline import kernel_ratio
from llmpq.models.shape import LinearShape, shape_from_config

TABLE = default_kernel_table()
Q = QuantSpec("gptq", 128)
FC1 = LinearShape("fc1", 7168, 28672, True)   # OPT-30B fc1: the shape the constants are fitted and checked on
OPT_30B = shape_from_config({"model_type": "opt", "hidden_size": 7168, "ffn_dim": 28672, "num_hidden_layers": 48,
                             "num_attention_heads": 56, "vocab_size": 50272, "max_position_embeddings": 2048,
                             "word_embed_proj_dim": 7168, "do_layer_norm_before": True, "enable_bias": True})
RESULT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "kernel_model.json"


@pytest.mark.parametrize("point", TABLE.reference, ids=lambda p: f"{p.kernel}{p.bits}-{p.device}-{p.rows}")
def test_kernel_model_reproduces_every_cited_point_within_20_percent(point):
    predicted = float(kernel_ratio(TABLE.spec(point.kernel), point.bits, load_device(point.device), FC1, Q,
                                   point.rows))
    assert predicted == pytest.approx(point.ratio, rel=0.20), point.source


def test_marlin_crossover_on_an_a100():
    """W4 Marlin beats fp16 up to ~128 rows and loses from 256 rows up (prefill at 4 bits is slower)."""
    a100 = load_device("a100-40g")
    ratio = {r: float(kernel_ratio(TABLE.spec("marlin"), 4, a100, FC1, Q, r)) for r in (1, 16, 32, 64, 256, 1024)}
    assert ratio[1] < ratio[32] < ratio[64] < 1.0 < ratio[256] and ratio[1024] > 1.0
    # kernels that materialise the weight are slower than fp16 at every row count
    for name, bits in (("triton", 4), ("torch", 3), ("torch", 2)):
        r = kernel_ratio(TABLE.spec(name), bits, a100, FC1, Q, np.asarray([1, 16, 128, 1024]))
        assert (r > 1.0).all(), name
    # ExLlama runs its fused GEMM up to 50 rows, then dequantizes + GEMM
    ex = TABLE.spec("exllama")
    assert kernel_ratio(ex, 4, a100, FC1, Q, 50) < 1.0 < kernel_ratio(ex, 4, a100, FC1, Q, 51)


def test_menus_follow_compute_capability():
    menus = {stem: kernel_menu(TABLE, load_device(stem), Q, OPT_30B) for stem in ("a100-40g", "t4", "v100-32g",
                                                                                 "p100-12g", "cpu")}
    assert menus["a100-40g"] == {16: ("fp16",), 8: ("marlin", "triton", "torch"),
                                 4: ("marlin", "exllama", "triton", "torch"), 3: ("torch",)}
    assert "marlin" in menus["t4"][4]                      # GPTQModel 7.6.0 runs Marlin from cc 7.5 (fp16)
    assert all("marlin" not in names for names in menus["v100-32g"].values())   # cc 7.0: never Marlin
    assert menus["v100-32g"][4] == ("exllama", "triton", "torch") and menus["v100-32g"][8] == ("triton", "torch")
    assert menus["p100-12g"][4] == ("exllama", "torch") and menus["p100-12g"][8] == ("torch",)  # no Triton below 7.0
    assert menus["cpu"] == {16: ("fp16",), 8: ("torch",), 4: ("torch",), 3: ("torch",), 2: ("torch",)}
    assert TABLE.fast_bits(load_device("v100-32g")) == (16, 4) and TABLE.fast_bits(load_device("cpu")) == (16,)


def test_alignment_and_group_size_limits():
    a100 = load_device("a100-40g")
    odd = TABLE.menu(a100, group_size=128, linears=[(7168, 28670)])
    assert odd[4] == ("torch",)                            # Marlin/ExLlama/Triton need aligned out_features
    assert "marlin" not in TABLE.menu(a100, group_size=256)[4] and "exllama" not in TABLE.menu(a100, group_size=256)[4]
    assert TABLE.menu(a100, sym=False)[4] == ("exllama", "triton", "torch")   # Marlin is symmetric only


def test_device_kernels_override_and_its_errors(tmp_path):
    (tmp_path / "device").mkdir()
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "one.yaml").write_text(
        "name: one\nnodes:\n  - {name: n0, devices: {gpu-x: 1}}\npresent: false\n"
        "links:\n  intra_node: {bandwidth_gbps: 16, latency_us: 10}\n  inter_node: {bandwidth_gbps: 1, latency_us: 50}\n")
    base = "defaults:\n  - a100-40g\n  - _self_\n"
    (tmp_path / "device" / "gpu-x.yaml").write_text(base + "kernels: {4: exllama}\n")
    exp = compose_experiment(["cluster=one", "model=opt-30b"], config_dir=tmp_path)
    assert kernel_menu(exp.kernels, exp.devices["gpu-x"], Q, OPT_30B)[4] == ("exllama",)
    (tmp_path / "device" / "gpu-x.yaml").write_text(base + "compute_capability: 7.0\nkernels: {4: marlin}\n")
    with pytest.raises(ConfigError, match=r"gpu-x\.yaml .*: kernels\.4: marlin needs compute capability >= 7\.5"):
        compose_experiment(["cluster=one", "model=opt-30b"], config_dir=tmp_path)
    (tmp_path / "device" / "gpu-x.yaml").write_text(base + "kernels: {4: cutlass}\n")
    with pytest.raises(ConfigError, match=r"kernels\.4: unknown kernel 'cutlass'"):
        compose_experiment(["cluster=one", "model=opt-30b"], config_dir=tmp_path)
    (tmp_path / "device" / "gpu-x.yaml").write_text(base + "kernels: {2: triton}\n")
    with pytest.raises(ConfigError, match=r"kernels\.2: 2 bits is not in this device's bits"):
        compose_experiment(["cluster=one", "model=opt-30b"], config_dir=tmp_path)


def test_every_shipped_gpu_declares_its_compute_capability():
    conf = Path(__file__).resolve().parents[1] / "conf" / "device"
    for path in sorted(conf.glob("*.yaml")):
        device = load_device(path.stem)
        assert (device.compute_capability is not None) == (device.kind == "gpu"), path.name


def test_benchmark_result_has_the_documented_keys():
    data = json.loads(RESULT.read_text())
    assert set(data["ratio"]) == {"a100-40g", "l4", "t4", "v100-32g"}
    assert "marlin" not in data["ratio"]["v100-32g"] and "marlin" in data["ratio"]["a100-40g"]
    assert set(data["ratio"]["a100-40g"]["marlin"]) == {"1", "16", "32", "128", "256", "1024"}
    assert set(data["ratio_by_shape"]) == {"opt-30b.fc1", "llama-3-70b.gate_proj"}
    assert data["max_reference_rel_error"] <= 0.20 and len(data["reference"]) == len(TABLE.reference)


@pytest.mark.slow
def test_kernel_limits_are_gptqmodels_own():
    """bits, symmetry, group sizes, alignment and Marlin's compute capability, read off GPTQModel 7.6.0's classes."""
    from llmpq.quantize.gptq_layout import qlinear_class

    for name in ("marlin", "exllama", "triton", "torch"):
        cls, spec = qlinear_class(name), TABLE.spec(name)
        assert set(spec.bits) <= set(cls.SUPPORTS_BITS), name
        assert set(spec.group_sizes or ()) <= set(cls.SUPPORTS_GROUP_SIZE), name
        assert set(spec.sym) == set(cls.SUPPORTS_SYM), name
        assert spec.in_divisible_by == max(cls.SUPPORTS_IN_FEATURES_DIVISIBLE_BY), name
        assert spec.out_divisible_by == max(cls.SUPPORTS_OUT_FEATURES_DIVISIBLE_BY), name
    assert set(TABLE.spec("marlin").bits) == set(qlinear_class("marlin").SUPPORTS_BITS)
    assert set(TABLE.spec("triton").bits) == set(qlinear_class("triton").SUPPORTS_BITS)
    from gptqmodel.nn_modules.qlinear import marlin

    major, minor = marlin._MARLIN_MIN_CAPABILITY
    assert TABLE.spec("marlin").min_compute_capability == major + minor / 10


def test_model_agrees_with_measured_gpu_kernels():
    """Every committed GPU measurement (`benchmarks/gpu_kernels.py` -> `benchmarks/results/kernels_<stem>.json`): the
    model puts each kernel on the same side of fp16 (faster or slower) at ≥ 90% of the measured (shape, bits, rows)
    points, and never calls a kernel that materialises the weight (Torch, Triton) faster than fp16."""
    import importlib.util
    from pathlib import Path

    from llmpq.config import default_kernel_table

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("kernel_model", root / "benchmarks" / "kernel_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fixtures = sorted((root / "benchmarks" / "results").glob("kernels_*.json"))
    if not fixtures:
        pytest.skip("no GPU kernel measurement committed")
    for fixture in fixtures:
        found = module.against_measured(default_kernel_table(), fixture)
        assert found["same_side_share"] >= 0.9, (fixture.name, found["same_side_share"])
        slow = [p for p in found["points"] if p["kernel"] in ("torch", "triton")]
        assert slow and all(p["measured"] > 1 and p["predicted"] > 1 for p in slow), fixture.name


def test_kernels_without_auto_padding_need_whole_groups():
    """Found on an H100: ExLlama refuses a 64-wide linear at group size 128 (GPTQModel: SUPPORTS_AUTO_PADDING False);
    the menu must not offer it, while Triton and Torch (which pad) stay."""
    from llmpq.config import default_kernel_table, load_device

    table, h100 = default_kernel_table(), load_device("h100")
    narrow = [(64, 64), (64, 256)]
    assert "group size 128" in table.unavailable("exllama", h100, 4, group_size=128, linears=narrow)
    assert "group size 128" in table.unavailable("marlin", h100, 4, group_size=128, linears=narrow)
    assert table.unavailable("triton", h100, 4, group_size=128, linears=narrow) is None
    assert table.unavailable("exllama", h100, 4, group_size=-1, linears=narrow) is None
    assert table.unavailable("exllama", h100, 4, group_size=128, linears=[(7168, 28672)]) is None
