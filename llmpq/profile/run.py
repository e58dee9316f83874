"""`llmpq profile device=STEM model=NAME`: time one real decoder layer, the embedding and the head on a grid.

For every bit-width the device supports: prefill (b prompts of s tokens, context s) on batches ×
prompt_lens, and decode (b sequences, one new token over a KV cache of c keys) on batches × contexts;
the embedding on the same (b, q) points and the head (last position + greedy sampling) per batch.
Each point gets `warmup` untimed calls, then one timed call per interleaved pass over the grid, for at
least `repeats` passes and until its timed calls add up to `min_time_ms` (at most `max_repeats`)
(`llmpq.profile.timing.measure_interleaved`).
Lengths are capped at the model's max positions. A part whose memory (weights + KV + activations at the
largest grid point, per `llmpq.costmodel.memory`) exceeds the device's capacity is not profiled, and the
latency model uses the roofline for it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from llmpq import paths
from llmpq.artifacts import provenance, write_table
from llmpq.config import DeviceSpec, QuantSpec, load_device
from llmpq.config.compose import config_hash
from llmpq.costmodel.memory import (
    activation_peak_bytes,
    capacity_bytes,
    dtype_bytes,
    embed_bytes,
    head_bytes,
    layer_kv_bytes,
    layer_weight_bytes,
)
from llmpq.models.shape import ModelShape, shape_from_config

from .timing import build_parts, embed_call, head_call, layer_call, measure_interleaved, quantize_randomly, torch_threads

QUANT_MODULE = "gptqmodel TorchLinear (eager dequantize + matmul)"


@dataclass(frozen=True)
class ProfileGrid:
    """Where and how often to time: the grid axes and warm-up/repeat counts (config key `profile`)."""

    batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    prompt_lens: tuple[int, ...] = (16, 32, 64, 128)
    contexts: tuple[int, ...] = (16, 32, 64, 128, 256)
    warmup: int = 2
    repeats: int = 5
    min_time_ms: float = 50.0
    max_repeats: int = 50

    @staticmethod
    def from_config(raw: Mapping[str, Any] | None) -> "ProfileGrid":
        """The grid from the `profile` config mapping; missing keys take the defaults, unknown keys fail."""
        raw = dict(raw or {})
        known = set(ProfileGrid.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"profile: unknown keys {unknown} (known: {sorted(known)})")
        values = {k: tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else
                  float(v) if k == "min_time_ms" else int(v) for k, v in raw.items()}
        grid = ProfileGrid(**values)
        for name in ("batches", "prompt_lens", "contexts"):
            axis = getattr(grid, name)
            if not axis or min(axis) < 1:
                raise ValueError(f"profile.{name}: needs positive integers, got {list(axis)}")
        if grid.repeats < 1 or grid.warmup < 0 or grid.min_time_ms < 0 or grid.max_repeats < grid.repeats:
            raise ValueError(f"profile: needs repeats >= 1, warmup >= 0, min_time_ms >= 0, max_repeats >= repeats; got "
                             f"{grid.repeats}, {grid.warmup}, {grid.min_time_ms}, {grid.max_repeats}")
        return grid

    def capped(self, max_positions: int) -> "ProfileGrid":
        """The grid with lengths above the model's max positions dropped (the cap itself added)."""
        def cap(axis: tuple[int, ...]) -> tuple[int, ...]:
            kept = sorted({x for x in axis if x <= max_positions})
            return tuple(kept) if len(kept) == len(set(axis)) else tuple(sorted(set(kept) | {max_positions}))
        return replace(self, batches=tuple(sorted(set(self.batches))), prompt_lens=cap(self.prompt_lens),
                       contexts=cap(self.contexts))


def layer_fits(shape: ModelShape, device: DeviceSpec, quant: QuantSpec, grid: ProfileGrid) -> bool:
    """Whether the dense layer, its KV cache and activations at the largest grid point fit the device."""
    b, s, c = max(grid.batches), max(grid.prompt_lens), max(grid.contexts)
    need = (layer_weight_bytes(shape, 16, quant, device) * 2  # the dense layer + one quantized copy
            + layer_kv_bytes(shape, b, max(s, c), device)
            + activation_peak_bytes(shape, device, b, s, s) + device.reserve_bytes)
    return need <= capacity_bytes(device)


def ends_fit(shape: ModelShape, device: DeviceSpec, grid: ProfileGrid) -> bool:
    """Whether embedding and (separately stored) head fit the device."""
    b = max(grid.batches)
    need = embed_bytes(shape, device) + head_bytes(shape, device, b, with_embedding=False) + device.reserve_bytes
    return need <= capacity_bytes(device)


def torch_device(device: DeviceSpec) -> tuple[torch.device, torch.dtype]:
    """The torch device and 16-bit dtype of a device config; checks a GPU's name against the config's."""
    if device.kind == "cpu":
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise ValueError(f"device {device.stem} is a GPU but no CUDA device is visible here")
    found = torch.cuda.get_device_name().replace(" ", "_")
    if found != device.name:
        raise ValueError(f"device {device.stem} expects a {device.name} but this machine has a {found}")
    return torch.device("cuda"), torch.float16


def profile_rows(hf_config: Mapping[str, Any], model: str, device: DeviceSpec, quant: QuantSpec, grid: ProfileGrid,
                 bits: Sequence[int] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Time every grid point of the layer (per bit-width), the embedding and the head: rows of the `profile` table."""
    shape = shape_from_config(hf_config)
    grid = grid.capped(shape.max_positions)
    bits = tuple(bits if bits is not None else device.bits)
    dev, dtype = torch_device(device)
    # A CPU device's memory is a planning cap on a slice of this machine, not a physical limit: time everything.
    physical = device.kind != "cpu"
    with_layer = not physical or layer_fits(shape, device, quant, grid)
    with_ends = not physical or ends_fit(shape, device, grid)
    if not with_layer:
        print(f"llmpq profile: one {model} layer does not fit {device.stem}; its latency will use the roofline",
              file=sys.stderr)
    rows: list[dict[str, Any]] = []

    def row(component: str, b_: int, phase: str, batch: int, q: int, c: int, t) -> dict[str, Any]:
        return {"device": device.stem, "model": model, "component": component, "bits": b_, "phase": phase,
                "batch": batch, "q_tokens": q, "context_len": c, "latency_ms": t.median_ms,
                "latency_ms_p10": t.p10_ms, "latency_ms_p90": t.p90_ms, "repeats": t.repeats}

    points = [("prefill", b, s, s) for b in grid.batches for s in grid.prompt_lens]
    points += [("decode", b, 1, c) for b in grid.batches for c in grid.contexts]
    ends = [("embed", p, b, q) for p, b, q, _ in points if p == "prefill"] + [("embed", "decode", b, 1) for b in grid.batches]
    ends += [("head", p, b, 1) for p in ("prefill", "decode") for b in grid.batches]
    total = (len(bits) * len(points) if with_layer else 0) + (len(ends) if with_ends else 0)
    with torch_threads(device.threads if device.kind == "cpu" else None), \
            tqdm(total=total, desc=f"profile {model} on {device.stem}", disable=not progress) as bar:
        timing = {"warmup": grid.warmup, "repeats": grid.repeats, "min_time_ms": grid.min_time_ms,
                  "max_repeats": grid.max_repeats, "device": dev, "on_done": bar.update}
        parts = build_parts(hf_config, dev, dtype, layer=with_layer, ends=with_ends)
        for b_ in bits if with_layer else ():
            layer = quantize_randomly(parts.layer, b_, quant.group_size, dev)
            makers = [partial(layer_call, parts, layer, batch, q, c, dev, dtype) for _, batch, q, c in points]
            for (phase, batch, q, c), t in zip(points, measure_interleaved(makers, **timing)):
                rows.append(row("layer", b_, phase, batch, q, c, t))
            del layer, makers
        if with_ends:
            makers = [partial(embed_call, parts, batch, q, dev) if component == "embed"
                      else partial(head_call, parts, batch, dev, dtype) for component, _, batch, q in ends]
            for (component, phase, batch, q), t in zip(ends, measure_interleaved(makers, **timing)):
                rows.append(row(component, 16, phase, batch, q, q, t))
    return rows


def profile_to(out: Path, hf_config: Mapping[str, Any], model: str, device: DeviceSpec, quant: QuantSpec,
               grid: ProfileGrid, bits: Sequence[int] | None = None, progress: bool = True) -> Path:
    """Profile and write the `profile` table to `out` (atomic), with the grid and settings in its metadata."""
    rows = profile_rows(hf_config, model, device, quant, grid, bits, progress)
    settings = {"grid": asdict(grid), "quant": asdict(quant), "threads": device.threads,
                "dtype_bytes": dtype_bytes(device), "quant_module": QUANT_MODULE}
    meta = provenance(config_hash({"device": asdict(device), "model": dict(hf_config), **settings}),
                      device=device.stem, **settings)
    return write_table("profile", rows, out, meta)


def cli_profile(exp, args) -> int:
    """`llmpq profile device=STEM [model=NAME] [out=PATH]`: profile the model on one device type."""
    from llmpq.models.source import hf_config_dict

    if not args.device:
        print("llmpq profile: device=STEM is required (a device config stem, e.g. device=cpu)", file=sys.stderr)
        return 2
    device = exp.devices.get(args.device) or load_device(args.device, args.config_dir)
    grid = ProfileGrid.from_config(exp.raw.get("profile"))
    out = args.out or paths.profile_path(args.results, device.stem, exp.model.name)
    path = profile_to(Path(out), hf_config_dict(exp.model, results=args.results), exp.model.name, device,
                      exp.model.quant, grid)
    print(f"wrote {path}")
    return 0
