"""`llmpq profile device=STEM model=NAME`: time one real decoder layer, the embedding and the head on a grid.

For every bit-width the device supports and every weight kernel of the device's menu for it
(`costmodel.kernels.kernel_menu`: on a CPU `torch`, on a GPU also `marlin`, `exllama`, `triton` where they
run; each row records the kernel it timed): prefill (b prompts of s tokens, context s) on batches ×
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
from typing import Any, Collection, Mapping, Sequence

import torch

from llmpq import paths
from llmpq.artifacts import provenance, write_table
from llmpq.config import DeviceSpec, KernelTable, QuantSpec, default_kernel_table, load_device
from llmpq.config.compose import config_hash
from llmpq.config.kernels import DENSE_KERNEL
from llmpq.costmodel.kernels import kernel_menu
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
from llmpq.progress import bar as progress_bar

from ..config.dtypes import device_dtype
from ..config.identity import device_mismatch
from ..runtime.measure import keep_freed_memory
from ..runtime.stage import found_gpu, torch_dtype
from .load import load_average
from .reference import reference_ms
from .stage_loop import hot_and_idle, loop_points
from .timing import build_parts, embed_call, head_call, layer_call, measure_interleaved, quantize_randomly, torch_threads

QUANT_MODULE = "gptqmodel quantized linears per kernel (see the rows' kernel column); TorchLinear eager"


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


def torch_device(device: DeviceSpec) -> torch.device:
    """The torch device of a device config; a GPU must be of the config's type (`llmpq.config.identity`)."""
    if device.kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device.stem} is a GPU but no CUDA device is visible here")
    problem = device_mismatch(device, found_gpu(torch.cuda.current_device()))
    if problem is not None:
        raise ValueError(f"profile on this machine's GPU: {problem}")
    return torch.device("cuda")


def profile_rows(hf_config: Mapping[str, Any], model: str, device: DeviceSpec, quant: QuantSpec, grid: ProfileGrid,
                 bits: Sequence[int] | None = None, progress: bool = True,
                 kernels: KernelTable | None = None, dtype: str = "auto", only_kernels: Collection[str] | None = None,
                 layers_only: bool = False) -> list[dict[str, Any]]:
    """Time every grid point of the layer (per bit-width and kernel of the device's menu, or of `only_kernels`),
    the embedding and the head, and the stage's per-step overheads (`llmpq.profile.stage_loop`): rows of the
    `profile` table. `dtype`: the model config's (`llmpq.config.dtypes`); `layers_only`: the layer alone."""
    shape = shape_from_config(hf_config)
    grid = grid.capped(shape.max_positions)
    menu = kernel_menu(kernels or default_kernel_table(), device, quant, shape)
    bits = tuple(b for b in (bits if bits is not None else device.bits) if b in menu)
    timed = [(b, k) for b in bits for k in menu[b] if only_kernels is None or k in only_kernels]
    dev, dtype = torch_device(device), torch_dtype(device_dtype(dtype, hf_config, device))
    if device.kind == "cpu":
        keep_freed_memory()  # the allocator mode a CPU stage times its steps in (`llmpq.runtime.measure`)
    # A CPU device's memory is a planning cap on a slice of this machine, not a physical limit: time everything.
    physical = device.kind != "cpu"
    with_layer = not physical or layer_fits(shape, device, quant, grid)
    with_ends = not layers_only and (not physical or ends_fit(shape, device, grid))
    if not with_layer:
        print(f"llmpq profile: one {model} layer does not fit {device.stem}; its latency will use the roofline",
              file=sys.stderr)
    rows: list[dict[str, Any]] = []

    def row(component: str, b_: int, kernel: str, phase: str, batch: int, q: int, c: int, t) -> dict[str, Any]:
        return {"device": device.stem, "model": model, "component": component, "bits": b_, "kernel": kernel,
                "phase": phase,
                "batch": batch, "q_tokens": q, "context_len": c, "latency_ms": t.median_ms,
                "latency_ms_p10": t.p10_ms, "latency_ms_p90": t.p90_ms, "repeats": t.repeats}

    points = [("prefill", b, s, s) for b in grid.batches for s in grid.prompt_lens]
    points += [("decode", b, 1, c) for b in grid.batches for c in grid.contexts]
    ends = [("embed", p, b, q) for p, b, q, _ in points if p == "prefill"] + [("embed", "decode", b, 1) for b in grid.batches]
    ends += [("head", p, b, 1) for p in ("prefill", "decode") for b in grid.batches]
    corners = [(phase, b, q, c) for phase, b, q, c in points
               if b in (min(grid.batches), max(grid.batches)) and c in _corner_lengths(grid, phase)]
    overheads = with_layer and with_ends
    total = (len(timed) * len(points) if with_layer else 0) + (len(ends) if with_ends else 0)
    total += (len(corners) + 2 * len(grid.batches)) if overheads else 0
    with torch_threads(device.threads if device.kind == "cpu" else None), \
            progress_bar(total=total, desc=f"profile {model} on {device.stem}", unit="points", disable=not progress) as bar:
        timing = {"warmup": grid.warmup, "repeats": grid.repeats, "min_time_ms": grid.min_time_ms,
                  "max_repeats": grid.max_repeats, "device": dev, "on_done": bar.update}
        parts = build_parts(hf_config, dev, dtype, layer=with_layer, ends=with_ends)
        for b_, kernel in timed if with_layer else ():
            layer = quantize_randomly(parts.layer, b_, quant.group_size, dev, kernel)
            makers = [partial(layer_call, parts, layer, batch, q, c, dev, dtype) for _, batch, q, c in points]
            for (phase, batch, q, c), t in zip(points, measure_interleaved(makers, **timing)):
                rows.append(row("layer", b_, kernel, phase, batch, q, c, t))
            del layer, makers
        if with_ends:
            makers = [partial(embed_call, parts, batch, q, dev) if component == "embed"
                      else partial(head_call, parts, batch, dev, dtype) for component, _, batch, q in ends]
            for (component, phase, batch, q), t in zip(ends, measure_interleaved(makers, **timing)):
                rows.append(row(component, 16, DENSE_KERNEL, phase, batch, q, q, t))
        if overheads:
            for phase, batch, q, c in corners:
                hot, idle = hot_and_idle(layer_call(parts, parts.layer, batch, q, c, dev, dtype), dev,
                                         max(grid.repeats, IDLE_PAIRS), grid.warmup)
                rows.append(row("layer_hot", 16, DENSE_KERNEL, phase, batch, q, c, hot))
                rows.append(row("layer_idle", 16, DENSE_KERNEL, phase, batch, q, c, idle))
                bar.update(1)
            for p in loop_points(hf_config, parts, grid.batches, min(grid.prompt_lens), dev, dtype, grid.repeats,
                                 grid.warmup):
                rows.append(row("loop", 16, DENSE_KERNEL, p.phase, p.batch, p.q_tokens, p.context_len, p.loop))
                bar.update(1)
    return rows


IDLE_PAIRS = 30   # hot/idle call pairs per corner point


def _corner_lengths(grid: ProfileGrid, phase: str) -> tuple[int, int]:
    axis = grid.prompt_lens if phase == "prefill" else grid.contexts
    return min(axis), max(axis)


def profile_to(out: Path, hf_config: Mapping[str, Any], model: str, device: DeviceSpec, quant: QuantSpec,
               grid: ProfileGrid, bits: Sequence[int] | None = None, progress: bool = True,
               kernels: KernelTable | None = None, dtype: str = "auto") -> Path:
    """Profile and write the `profile` table to `out` (atomic), with the grid, the settings and the idle reference
    timing (`llmpq.profile.reference`, taken after the grid) in its metadata."""
    rows = profile_rows(hf_config, model, device, quant, grid, bits, progress, kernels, dtype)
    compute = device_dtype(dtype, hf_config, device)
    with torch_threads(device.threads if device.kind == "cpu" else None):
        reference = reference_ms(torch_device(device), torch_dtype(compute) if device.kind != "cpu" else torch.float32)
    settings = {"grid": asdict(grid), "quant": asdict(quant), "threads": device.threads,
                "dtype_bytes": dtype_bytes(device), "dtype": compute, "quant_module": QUANT_MODULE,
                "reference_ms": reference, **load_average()}
    timed = {k: v for k, v in settings.items() if k not in ("reference_ms", "load_average", "cores")}
    meta = provenance(config_hash({"device": asdict(device), "model": dict(hf_config), **timed}),
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
                      exp.model.quant, grid, kernels=exp.kernels, dtype=exp.model.dtype)
    print(f"wrote {path}")
    return 0
