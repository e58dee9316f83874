"""Which GPU a device config is (name pattern + memory) and which dtype a model computes in on it."""

from __future__ import annotations

import pytest

from llmpq.config import ConfigError, load_device
from llmpq.config.dtypes import device_dtype, plan_dtype
from llmpq.config.identity import FoundDevice, GpuIdentity, device_mismatch, identity_mismatch, matching_device
from llmpq.config.types import GIB
from llmpq.runtime.caps import DeviceMismatch
from llmpq.runtime.job import StageSpec
from llmpq.runtime.launch import cuda_assignment

GPUS = "t4 v100-16g v100-32g p100-12g a10 a100-40g a100-80g l4 l40s h100 h200 rtx3090 rtx4090".split()


def gpu(name: str, gib: float) -> FoundDevice:
    return FoundDevice(name, int(gib * GIB))


@pytest.fixture(scope="module")
def devices():
    return {stem: load_device(stem) for stem in GPUS}


@pytest.mark.parametrize("name,gib,stem", [
    ("NVIDIA A100 80GB PCIe", 79.2, "a100-80g"), ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40g"),
    ("Tesla V100-PCIE-32GB", 31.7, "v100-32g"), ("Tesla V100-SXM2-16GB", 15.8, "v100-16g"),
    ("NVIDIA H100 80GB HBM3", 79.18, "h100"), ("NVIDIA H100 PCIe", 79.6, "h100"), ("NVIDIA H100 NVL", 93.1, None),
    ("Tesla T4", 14.7, "t4"), ("NVIDIA A10G", 22.3, "a10"), ("NVIDIA L4", 22.0, "l4"), ("NVIDIA L40S", 44.4, "l40s"),
    ("NVIDIA GeForce RTX 4090", 23.6, "rtx4090"), ("Tesla P100-PCIE-12GB", 11.9, "p100-12g"),
])
def test_driver_names_match_by_pattern_and_memory(devices, name, gib, stem):
    assert matching_device(devices, gpu(name, gib)) == stem


def test_mismatch_names_planned_and_found(devices):
    wrong_size = device_mismatch(devices["v100-16g"], gpu("Tesla V100-PCIE-32GB", 31.7))
    assert "planned v100-16g" in wrong_size and "Tesla V100-PCIE-32GB" in wrong_size and "memory" in wrong_size
    wrong_card = device_mismatch(devices["t4"], gpu("NVIDIA A10", 22.0))
    assert "planned t4" in wrong_card and "found NVIDIA A10" in wrong_card
    assert device_mismatch(load_device("cpu"), gpu("anything", 1)) is None
    # a config without name_pattern matches its name as a whole word, spaces and underscores alike
    plain = GpuIdentity("x", "NVIDIA_A10", None, 22.5)
    assert identity_mismatch(plain, gpu("NVIDIA A10", 22.0)) is None
    assert identity_mismatch(plain, gpu("NVIDIA A100-SXM4-80GB", 22.0)) is not None


def test_name_pattern_is_checked_and_gpu_only(tmp_path):
    (tmp_path / "device").mkdir()
    base = "defaults:\n  - t4\n  - _self_\n"
    (tmp_path / "device" / "bad.yaml").write_text(base + "name_pattern: '(T4'\n")
    with pytest.raises(ConfigError, match="name_pattern"):
        load_device("bad", tmp_path)
    (tmp_path / "device" / "cpux.yaml").write_text("defaults:\n  - cpu\n  - _self_\nname_pattern: 'x'\n")
    with pytest.raises(ConfigError, match="name_pattern"):
        load_device("cpux", tmp_path)


def _spec(index: int, device: str, devices) -> StageSpec:
    d = devices[device]
    return StageSpec(index, device, "n0", "gpu", d.name, None, index, index + 1, (16,), 1, 1, 1, 1, None,
                     name_pattern=d.name_pattern, memory_gib=d.memory_gib)


def test_stages_take_gpus_of_their_planned_type(devices):
    found = [gpu("Tesla V100-SXM2-32GB", 31.7), gpu("Tesla T4", 14.7), gpu("Tesla T4", 14.7)]
    specs = [_spec(0, "t4", devices), _spec(1, "v100-32g", devices), _spec(2, "t4", devices)]
    assert cuda_assignment(specs, found) == [1, 0, 2]
    with pytest.raises(DeviceMismatch, match=r"stage 1 needs a v100-16g .*free GPUs here: \['Tesla V100"):
        cuda_assignment([_spec(0, "t4", devices), _spec(1, "v100-16g", devices)], found)


def test_dtype_follows_checkpoint_and_device(devices):
    cpu = load_device("cpu")
    llama = {"torch_dtype": "bfloat16"}
    opt = {"torch_dtype": "float16"}
    assert device_dtype("auto", llama, cpu) == "float32"
    assert device_dtype("auto", llama, devices["a100-80g"]) == "bfloat16"
    assert device_dtype("auto", llama, devices["v100-32g"]) == "float16"      # Volta has no bf16
    assert device_dtype("auto", opt, devices["a100-80g"]) == "float16"        # an fp16 checkpoint stays fp16
    assert device_dtype("auto", {"dtype": "float32"}, devices["h100"]) == "bfloat16"
    assert device_dtype("float16", llama, devices["h100"]) == "float16"
    # one dtype per plan: bf16 only where every GPU has it
    assert plan_dtype("auto", llama, [devices["a100-80g"], devices["t4"]]) == "float16"
    with pytest.raises(ValueError, match="t4 have no bfloat16"):
        plan_dtype("bfloat16", llama, [devices["a100-80g"], devices["t4"]])
