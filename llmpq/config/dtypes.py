"""The compute dtype of a model on a device, and of a plan (no torch import).

A model config's `dtype` is `auto` (the default), `float16` or `bfloat16`; a CPU stage always computes in
float32. `auto` follows the checkpoint (`torch_dtype` / `dtype` of its HF config): a float16 checkpoint
(OPT's) computes in float16; any other (bfloat16 for Llama, Qwen, BLOOM; float32) in bfloat16 where the
device supports it (compute capability >= 8.0: Ampere and later) and in float16 otherwise (Volta, Turing,
Pascal: bfloat16 values can overflow there, which the README warns about). An explicit `bfloat16` on a device
below 8.0 is refused. Every GPU stage of a plan computes in one dtype (their messages must agree): bfloat16
only if every GPU of the plan supports it (`plan_dtype`). Profile, quantized-layer scales, deploy, the batch
job and perplexity use the same resolution; the plan records it (`dtype`). Both 16-bit dtypes take 2 bytes,
so the memory model is the same for either.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .types import DeviceSpec

DTYPES = ("float32", "float16", "bfloat16")
MODEL_DTYPES = ("auto", "float16", "bfloat16")
BF16_MIN_CAPABILITY = 8.0


def checkpoint_dtype(hf_config: Mapping[str, Any] | None) -> str | None:
    """The dtype the checkpoint's HF config names (`torch_dtype`, or `dtype` in transformers 5), if any."""
    if not hf_config:
        return None
    value = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return str(value).replace("torch.", "") if value else None


def supports_bf16(device: DeviceSpec) -> bool:
    """bfloat16 arithmetic: CPUs, and GPUs of compute capability >= 8.0 (unknown capability: no)."""
    if device.kind == "cpu":
        return True
    return device.compute_capability is not None and device.compute_capability >= BF16_MIN_CAPABILITY


def plan_dtype(model_dtype: str, hf_config: Mapping[str, Any] | None, devices: Iterable[DeviceSpec]) -> str:
    """The dtype every stage on `devices` computes in (module docstring); ValueError for bfloat16 asked of a device
    without it."""
    if model_dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype {model_dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
    devices = list(devices)
    gpus = [d for d in devices if d.kind != "cpu"]
    if not gpus:
        return "float32"
    lacking = [d.stem for d in gpus if not supports_bf16(d)]
    if model_dtype == "bfloat16" and lacking:
        raise ValueError(f"dtype bfloat16: devices {', '.join(sorted(set(lacking)))} have no bfloat16 "
                         f"(compute capability below {BF16_MIN_CAPABILITY}); use dtype float16 or auto")
    if model_dtype != "auto":
        return model_dtype
    if checkpoint_dtype(hf_config) == "float16" or lacking:
        return "float16"
    return "bfloat16"


def device_dtype(model_dtype: str, hf_config: Mapping[str, Any] | None, device: DeviceSpec) -> str:
    """The dtype `device` computes the model in on its own (what its profile times)."""
    return plan_dtype(model_dtype, hf_config, [device])
