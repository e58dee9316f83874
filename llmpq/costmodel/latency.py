"""Latency of layers, embedding and head per device: fitted to a profile, else the roofline.

A profile holds, per (component, bits, kernel, phase), medians on a rectangular grid of (batch, length),
where length is the prompt (prefill: q = c = length), the context (decode: q = 1, c = length) or the query
tokens (embedding); the head has length 1. `kernel` is the weight kernel that ran the layer's linears
(`conf/kernels.yaml`; `fp16` for 16 bits, the embedding and the head). The fit:

- inside the grid: bilinear interpolation (in batch and length, linear coordinates: exact for
  α + β·b + γ·L + δ·b·L) of the grid made monotone along both axes (alternating isotonic regression, so
  a noisy point is averaged with its neighbours rather than raising everything above it), so the
  result is never negative and non-decreasing in batch and length;
- outside the grid: the value at the nearest grid point (coordinates clamped) times the roofline's growth
  along each axis, ρ_b = R(b, L_ref)/R(b*, L_ref) and ρ_L = R(b_ref, L)/R(b_ref, L*) with fixed references
  (the grid's largest batch and length): continuous at the edge (ρ = 1 there) and monotone by construction;
- a device without a profile (or a component the profile lacks): the roofline from the device config and
  the kernel's constants; a bit-width the profile lacks: the roofline at those bits scaled by
  profile/roofline at the nearest bit-width profiled *with the same kernel*; a kernel the profile lacks:
  its roofline. A profile of one kernel never stands in for another.

Per-step overheads, from the same profile (`llmpq.profile.stage_loop`), named terms of a stage's time:
`loop_ms` (the stage loop's own cost per step, per phase and batch) and `after_idle_ms` (what a layer called
right after an idle gap costs more than one called back to back, per phase: caches refilled once per call, an
added time rather than a factor, so a slow quantized layer does not pay it in proportion). Without a profile
both are 0 (a roofline device: nothing measured; `overhead_source` says which).

The scaling is per device stem, so efficiencies seen on a CPU never leak into a GPU's numbers. Every layer
time names its kernel; `kernel=None` asks for the fastest of the device's menu at that point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

from llmpq.config import DeviceSpec, KernelTable, QuantSpec, default_kernel_table
from llmpq.config.kernels import DENSE_BITS, DENSE_KERNEL
from llmpq.models.shape import ModelShape

from .kernels import kernel_menu
from .roofline import PHASES, LayerRoofline, embed_roofline_ms, head_roofline_ms

if TYPE_CHECKING:
    import pyarrow as pa

COMPONENTS = ("layer", "embed", "head", "layer_hot", "layer_idle", "loop")
LAYER_COMPONENTS = ("layer", "layer_hot", "layer_idle")   # decode rows keyed by context length
FitKey = tuple[str, int, str, str]  # (component, bits, kernel, phase)


@dataclass(frozen=True)
class Grid:
    """Monotone latency table on a rectangular (batch × length) grid, in ms."""

    batches: tuple[float, ...]
    lengths: tuple[float, ...]
    values_ms: tuple[tuple[float, ...], ...]  # [batch index][length index]
    _arrays: tuple[np.ndarray, np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        arrays = (np.asarray(self.batches, float), np.asarray(self.lengths, float), np.asarray(self.values_ms, float))
        for a in arrays:
            a.setflags(write=False)
        object.__setattr__(self, "_arrays", arrays)

    @staticmethod
    def from_points(batches: np.ndarray, lengths: np.ndarray, latency_ms: np.ndarray, where: str) -> "Grid":
        """Grid from measured points (medians of duplicates), made monotone along both axes (`monotone_2d`)."""
        xs, ys = np.unique(batches), np.unique(lengths)
        table = np.full((len(xs), len(ys)), np.nan)
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                hit = latency_ms[(batches == x) & (lengths == y)]
                if len(hit):
                    table[i, j] = float(np.median(hit))
        if np.isnan(table).any():
            missing = [(int(xs[i]), int(ys[j])) for i, j in zip(*np.nonzero(np.isnan(table)))]
            raise ValueError(f"{where}: profile grid is not rectangular, missing (batch, length) {missing[:5]}")
        table = monotone_2d(np.clip(table, 0.0, None))
        return Grid(tuple(map(float, xs)), tuple(map(float, ys)), tuple(tuple(map(float, r)) for r in table))

    def clamp(self, batch: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The nearest grid-box point: each coordinate clamped to the grid's range."""
        return (np.clip(batch, self.batches[0], self.batches[-1]), np.clip(length, self.lengths[0], self.lengths[-1]))

    def interpolate(self, batch: np.ndarray, length: np.ndarray) -> np.ndarray:
        """Bilinear interpolation at points inside the grid box (callers clamp first) (ms)."""
        xs, ys, v = self._arrays
        i, t = _bracket(xs, batch)
        j, u = _bracket(ys, length)
        i1 = np.minimum(i + 1, v.shape[0] - 1)
        j1 = np.minimum(j + 1, v.shape[1] - 1)
        low = v[i, j] * (1 - u) + v[i, j1] * u
        high = v[i1, j] * (1 - u) + v[i1, j1] * u
        return low * (1 - t) + high * t


def isotonic(values: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit of a sequence (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(int(c), s / c) for s, c in blocks])


def monotone_2d(table: np.ndarray, iterations: int = 100) -> np.ndarray:
    """A table non-decreasing along both axes, close to `table`: alternating isotonic fits of the columns and
    rows (a violating outlier is averaged with its neighbours, not propagated), then running maxima to make
    the result exactly monotone."""
    t = np.asarray(table, dtype=float)
    for _ in range(iterations):
        nxt = np.apply_along_axis(isotonic, 1, np.apply_along_axis(isotonic, 0, t))
        done = np.allclose(nxt, t, rtol=1e-9, atol=0.0)
        t = nxt
        if done:
            break
    return np.maximum.accumulate(np.maximum.accumulate(t, axis=0), axis=1)


def _bracket(axis: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the grid cell holding x and x's fraction inside it (0 for a one-point axis)."""
    if len(axis) == 1:
        return np.zeros_like(x, dtype=int), np.zeros_like(x, dtype=float)
    i = np.clip(np.searchsorted(axis, x, side="right") - 1, 0, len(axis) - 2)
    t = (x - axis[i]) / (axis[i + 1] - axis[i])
    return i, np.clip(t, 0.0, 1.0)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


@dataclass(frozen=True)
class LatencyModel:
    """Per-device latency of a layer (per kernel), the embedding and the head (ms); immutable after construction."""

    shape: ModelShape
    devices: Mapping[str, DeviceSpec]
    quant: QuantSpec
    fits: Mapping[str, Mapping[FitKey, Grid]] = field(default_factory=dict)  # device stem -> fitted grids
    kernels: KernelTable | None = None   # None: the shipped table
    _rooflines: dict = field(init=False, repr=False, compare=False)
    _points: dict = field(init=False, repr=False, compare=False)   # memo of `layer_ms` (a pure function)
    _menus: Mapping[str, Mapping[int, tuple[str, ...]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", MappingProxyType(dict(self.devices)))
        object.__setattr__(self, "fits", MappingProxyType({d: MappingProxyType(dict(f)) for d, f in self.fits.items()}))
        table = self.kernels or default_kernel_table()
        object.__setattr__(self, "kernels", table)
        object.__setattr__(self, "_menus", MappingProxyType({
            stem: MappingProxyType(kernel_menu(table, spec, self.quant, self.shape))
            for stem, spec in self.devices.items()}))
        object.__setattr__(self, "_rooflines", {})
        object.__setattr__(self, "_points", {})

    def source(self, device: str) -> str:
        """"profile" where the device has a fitted profile, else "roofline"."""
        self._device(device)
        return "profile" if self.fits.get(device) else "roofline"

    def menu(self, device: str) -> Mapping[int, tuple[str, ...]]:
        """bits -> kernels a layer of this model may use on `device` (`costmodel.kernels.kernel_menu`)."""
        self._device(device)
        return self._menus[device]

    def layer_ms(self, device: str, bits: int, phase: str, batch: int, q_tokens: int, context_len: int,
                 kernel: str | None = None) -> float:
        """t_layer(device, bits, kernel, phase, b, q, c): one decoder layer for b sequences of q new tokens (ms)."""
        key = (device, bits, phase, batch, q_tokens, context_len, kernel)
        if key not in self._points:
            self._points[key] = float(self.layer_ms_many(device, bits, phase, batch, q_tokens,
                                                         np.asarray([context_len]), kernel)[0])
        return self._points[key]

    def layer_ms_many(self, device: str, bits: int, phase: str, batch: int, q_tokens: int,
                      context_lens: np.ndarray, kernel: str | None = None) -> np.ndarray:
        """`layer_ms` at many context lengths at once (ms); what the estimator uses for all decode rounds.
        `kernel=None`: the fastest kernel of the device's menu for `bits`, point by point."""
        if kernel is None:
            return np.min([self.layer_ms_many(device, bits, phase, batch, q_tokens, context_lens, k)
                           for k in self.kernels_for(device, bits)], axis=0)
        self._check_kernel(device, bits, kernel)
        _check(phase, batch, q_tokens)
        c = np.asarray(context_lens, dtype=float)
        b = np.full_like(c, float(batch))

        def canonical(bb: np.ndarray, length: np.ndarray, at_bits: int) -> np.ndarray:
            """Roofline of the profiled shape: prefill q = c = length, decode q = 1, c = length."""
            q = length if phase == "prefill" else 1.0
            return self._roofline(device, at_bits, kernel).ms(phase, bb, q, length)

        length = np.full_like(c, float(q_tokens)) if phase == "prefill" else c
        base = self._fitted(device, ("layer", bits, kernel, phase), b, length, canonical)
        if q_tokens == 1 if phase == "decode" else bool(np.all(c == q_tokens)):
            return base
        exact = self._roofline(device, bits, kernel).ms(phase, b, float(q_tokens), c)  # off the profiled shape
        return base * _ratio(exact, canonical(b, length, bits))

    def kernels_for(self, device: str, bits: int) -> tuple[str, ...]:
        """The kernels of the device's menu for `bits`; ValueError when there is none."""
        names = self.menu(device).get(bits)
        if not names:
            raise ValueError(f"device {device} has no kernel for {bits}-bit layers of this model "
                             f"(its menu: {dict(self.menu(device))})")
        return names

    def embed_ms(self, device: str, phase: str, batch: int, q_tokens: int) -> float:
        """t_embed(device, phase, b, q): token (+ position) embedding of b·q tokens (ms)."""
        spec = self._device(device)
        _check(phase, batch, q_tokens)
        return float(self._fitted(device, ("embed", DENSE_BITS, DENSE_KERNEL, phase), np.asarray([float(batch)]),
                                  np.asarray([float(q_tokens)]),
                                  lambda b, q, _bits: embed_roofline_ms(self.shape, spec, phase, b, q))[0])

    def head_ms(self, device: str, phase: str, batch: int) -> float:
        """t_head(device, phase, b): final norm + LM head on the last position + greedy sampling (ms)."""
        spec = self._device(device)
        _check(phase, batch, 1)
        return float(self._fitted(device, ("head", DENSE_BITS, DENSE_KERNEL, phase), np.asarray([float(batch)]),
                                  np.asarray([1.0]),
                                  lambda b, _q, _bits: head_roofline_ms(self.shape, spec, phase, b))[0])

    def loop_ms(self, device: str, phase: str, batch: int) -> float:
        """t_loop(device, phase, b): the stage loop's own cost per step (ms): profile component `loop`
        (`llmpq.profile.stage_loop`), interpolated in b and held constant outside the profiled batches; 0 where the
        device has no such profile (a roofline device)."""
        self._device(device)
        _check(phase, batch, 1)
        grid = self.fits.get(device, {}).get(("loop", DENSE_BITS, DENSE_KERNEL, phase))
        if grid is None:
            return 0.0
        b, length = grid.clamp(np.asarray([float(batch)]), np.asarray([grid.lengths[0]]))
        return float(grid.interpolate(b, length)[0])

    def after_idle_ms(self, device: str, phase: str) -> float:
        """t_idle(device, phase) >= 0 (ms): what a layer call right after an idle gap costs more than one right after
        another call, the median difference over the profiled corner points (components `layer_idle` /
        `layer_hot`); 0 without them."""
        self._device(device)
        fits = self.fits.get(device, {})
        hot = fits.get(("layer_hot", DENSE_BITS, DENSE_KERNEL, phase))
        idle = fits.get(("layer_idle", DENSE_BITS, DENSE_KERNEL, phase))
        if hot is None or idle is None:
            return 0.0
        extra = np.asarray(idle.values_ms, float) - np.asarray(hot.values_ms, float)
        return max(0.0, float(np.median(extra)))

    def overhead_source(self, device: str) -> str:
        """"profile" where the device's profile measured the per-step overheads, else "none" (they count 0)."""
        fits = self.fits.get(device, {})
        return "profile" if any(key[0] in ("loop", "layer_idle") for key in fits) else "none"

    def _check_kernel(self, device: str, bits: int, kernel: str) -> None:
        if kernel not in self.kernels_for(device, bits):
            raise ValueError(f"kernel {kernel!r} is not in device {device}'s menu for {bits}-bit layers "
                             f"({', '.join(self.kernels_for(device, bits))})")

    def _roofline(self, device: str, bits: int, kernel: str) -> LayerRoofline:
        key = (device, bits, kernel)
        found = self._rooflines.get(key)
        if found is None:
            found = LayerRoofline.of(self.shape, bits, self.quant, self._device(device), self.kernels.spec(kernel))
            self._rooflines[key] = found
        return found

    def _device(self, device: str) -> DeviceSpec:
        if device not in self.devices:
            raise KeyError(f"no device config for {device!r} (known: {', '.join(self.devices)})")
        return self.devices[device]

    def _fitted(self, device: str, key: FitKey, batch: np.ndarray, length: np.ndarray,
                roof: Callable[..., np.ndarray]) -> np.ndarray:
        """The fitted value at (batch, length), extrapolated along the roofline; the roofline without a fit.

        `roof(batch, length, bits)` is the roofline of the profiled shape on the key's kernel (ms). A bit-width
        without a fit borrows the nearest bit-width fitted with the same kernel, scaled by the roofline ratio.
        """
        fits = self.fits.get(device, {})
        component, bits, kernel, phase = key
        if key not in fits:
            profiled = sorted(b for (c, b, k, p) in fits if c == component and k == kernel and p == phase)
            if not profiled:
                return roof(batch, length, bits)
            near = min(profiled, key=lambda b: (abs(b - bits), -b))
            return self._fitted(device, (component, near, kernel, phase), batch, length, roof) * _ratio(
                roof(batch, length, bits), roof(batch, length, near))
        grid = fits[key]
        bc, lc = grid.clamp(batch, length)
        b_ref, l_ref = np.full_like(batch, grid.batches[-1]), np.full_like(length, grid.lengths[-1])
        growth_b = _ratio(roof(batch, l_ref, bits), roof(bc, l_ref, bits))
        growth_l = _ratio(roof(b_ref, length, bits), roof(b_ref, lc, bits))
        return grid.interpolate(bc, lc) * growth_b * growth_l


def _check(phase: str, batch: int, q_tokens: int) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r} (known: {', '.join(PHASES)})")
    if batch < 1 or q_tokens < 1:
        raise ValueError(f"batch and q_tokens must be >= 1, got batch={batch}, q_tokens={q_tokens}")


def fit_profile(table: "pa.Table", where: str) -> dict[FitKey, Grid]:
    """Grids of one device's profile table (a pyarrow Table of the `profile` schema), by (component, bits, kernel,
    phase)."""
    df = table.to_pandas()
    fits: dict[FitKey, Grid] = {}
    for (component, bits, kernel, phase), rows in df.groupby(["component", "bits", "kernel", "phase"], sort=True):
        if component not in COMPONENTS or phase not in PHASES:
            raise ValueError(f"{where}: unknown component/phase {component!r}/{phase!r}")
        length = rows["context_len"] if component in LAYER_COMPONENTS and phase == "decode" else rows["q_tokens"]
        fits[(str(component), int(bits), str(kernel), str(phase))] = Grid.from_points(
            rows["batch"].to_numpy(float), length.to_numpy(float), rows["latency_ms"].to_numpy(float),
            f"{where} [{component}, {bits} bits, {kernel}, {phase}]")
    return fits


def build_latency_model(shape: ModelShape, devices: Mapping[str, DeviceSpec], quant: QuantSpec,
                        profiles: Mapping[str, Path], kernels: KernelTable | None = None) -> LatencyModel:
    """Fit every device's profile (device stem -> profile parquet); stems without one use the roofline of each
    kernel (`kernels`, default the shipped table)."""
    from llmpq.artifacts import read_table

    fits: dict[str, dict[FitKey, Grid]] = {}
    for stem, path in profiles.items():
        if stem not in devices:
            raise KeyError(f"profile for unknown device {stem!r}: {path}")
        table = read_table("profile", path)
        stems = set(table.column("device").to_pylist())
        if stems - {stem}:
            raise ValueError(f"{path}: profile of device(s) {sorted(stems)}, expected {stem!r}")
        fits[stem] = fit_profile(table, str(path))
    return LatencyModel(shape=shape, devices=devices, quant=quant, fits=fits, kernels=kernels)
