"""ω tables (per-layer sensitivity at each bit-width) and the quality budget Ω on Σω.

Two sources of ω[i, b]:

- `indicator`: the `sensitivity` table written by `llmpq calibrate` (one indicator's rows);
- `proxy`: a shape-only stand-in for models without weights here,
  ω[i, b] = (P_i / P_layers) · 4^(4 − b) for b < 16 and 0 at 16 bits, with P_i the parameters of layer i.
  4^(−b) is how the squared quantization step (the noise power of round-to-nearest) scales with the
  bit-width; the constant 4^4 makes Σω = 1 for the whole model at 4 bits (8 bits: 1/256, 3 bits: 4).

The budget Ω comes from exactly one of `solver.max_ppl_increase` (through the model's ppl_map, which
only applies to indicator ω), `solver.max_omega`, `solver.budget_from` (Σω of another method's plan),
or none (Ω = ∞).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llmpq.config import SolverSpec
from llmpq.models.shape import ModelShape

FULL_BITS = 16
PROXY_REFERENCE_BITS = 4
INDICATOR_PREFERENCE = ("output_error", "kl", "variance")  # output_error: the default of calibrate and ppl_map


@dataclass(frozen=True, eq=False)
class OmegaTable:
    """ω[i, b] for layers i = 0..L−1 (rows) and `bits` (columns); `source` is "indicator" or "proxy"."""

    bits: tuple[int, ...]
    values: np.ndarray
    source: str
    indicator: str | None = None

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=float)
        if values.ndim != 2 or values.shape[1] != len(self.bits):
            raise ValueError(f"ω table: expected shape (layers, {len(self.bits)}), got {values.shape}")
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError("ω table: values must be finite and >= 0")
        values.setflags(write=False)
        object.__setattr__(self, "values", values)

    @property
    def num_layers(self) -> int:
        return self.values.shape[0]

    def column(self, bits: int) -> np.ndarray:
        return self.values[:, self.bits.index(bits)]

    def total(self, bits_per_layer: Sequence[int]) -> float:
        """Σ_i ω[i, b_i] of a per-layer assignment."""
        if len(bits_per_layer) != self.num_layers:
            raise ValueError(f"{len(bits_per_layer)} bit-widths for {self.num_layers} layers")
        return math.fsum(float(self.values[i, self.bits.index(int(b))]) for i, b in enumerate(bits_per_layer))


def proxy_omega(shape: ModelShape, bits: Sequence[int]) -> OmegaTable:
    """Shape-only ω: (P_i / P_layers) · 4^(4 − b), 0 at 16 bits (see the module docstring)."""
    share = np.full(shape.num_layers, 1.0 / shape.num_layers)  # decoder layers share one shape
    cols = [np.zeros_like(share) if b >= FULL_BITS else share * 4.0 ** (PROXY_REFERENCE_BITS - b) for b in bits]
    return OmegaTable(tuple(bits), np.stack(cols, axis=1), "proxy")


def layer_pattern(table: OmegaTable, bits: int = PROXY_REFERENCE_BITS) -> np.ndarray:
    """A measured table's per-layer shape: its ω column at `bits`, divided by its mean (mean 1)."""
    column = table.column(bits)
    if column.mean() <= 0:
        raise ValueError(f"ω table has no positive ω at {bits} bits to take a per-layer pattern from")
    return column / column.mean()


def scaled_omega(base: OmegaTable, pattern: Sequence[float]) -> OmegaTable:
    """`base` with layer i's row scaled by `pattern` (points spread evenly over the layers, linearly interpolated
    at layer i): a per-layer ω of realistic shape for a model with no table of its own. The source stays `base`'s."""
    points = np.asarray(pattern, dtype=float)
    if points.ndim != 1 or len(points) < 2 or (points < 0).any():
        raise ValueError("a per-layer pattern needs at least two non-negative values")
    scale = np.interp(np.linspace(0.0, 1.0, base.num_layers), np.linspace(0.0, 1.0, len(points)), points)
    return OmegaTable(base.bits, base.values * scale[:, None], base.source, base.indicator)


def choose_indicator(available: Sequence[str], wanted: str | None) -> str:
    """The indicator to plan with: `wanted` if given, else the first of INDICATOR_PREFERENCE present."""
    if wanted is not None:
        if wanted not in available:
            raise ValueError(f"sensitivity table has no indicator {wanted!r} (has: {', '.join(sorted(available))})")
        return wanted
    for name in INDICATOR_PREFERENCE:
        if name in available:
            return name
    usable = sorted(a for a in available if a != "bits_only") or sorted(available)
    return usable[0]


def indicator_omega(path: Path, num_layers: int, bits: Sequence[int], indicator: str | None) -> OmegaTable:
    """ω from a `sensitivity` table; a missing 16-bit column counts as 0 (the unquantized reference)."""
    from llmpq.artifacts import read_table

    rows = read_table("sensitivity", path).to_pylist()
    name = choose_indicator(sorted({r["indicator"] for r in rows}), indicator)
    got = {(int(r["layer"]), int(r["bits"])): float(r["omega"]) for r in rows if r["indicator"] == name}
    values = np.zeros((num_layers, len(bits)))
    for i in range(num_layers):
        for c, b in enumerate(bits):
            if (i, b) in got:
                values[i, c] = got[(i, b)]
            elif b < FULL_BITS:
                raise ValueError(f"{path}: indicator {name!r} has no ω for layer {i} at {b} bits")
    return OmegaTable(tuple(bits), values, "indicator", name)


def load_omega(results: Path, model: str, shape: ModelShape, bits: Sequence[int],
               indicator: str | None = None, required: bool = False) -> OmegaTable:
    """Indicator ω if `results/sensitivity/{model}.parquet` exists, else the shape-only proxy (or, when the table
    is `required` — an indicator was asked for by name — a FileNotFoundError saying how to make it)."""
    from llmpq import paths

    path = paths.sensitivity_path(Path(results), model)
    if path.is_file():
        return indicator_omega(path, shape.num_layers, bits, indicator)
    if required:
        raise FileNotFoundError(f"{path}: no sensitivity table for indicator {indicator!r}: run `llmpq calibrate "
                                f"model={model}` (or the workflow's calibrate rule) first, or drop indicator=")
    return proxy_omega(shape, bits)


def load_ppl_map_if_any(results: Path, model: str) -> Any | None:
    """The model's ppl_map (`predict`, `omega_budget`, `indicator`), or None where none was fitted."""
    from llmpq import paths

    path = paths.ppl_map_path(Path(results), model)
    if not path.is_file():
        return None
    from llmpq.sensitivity.ppl_map import load_ppl_map

    return load_ppl_map(path)


@dataclass(frozen=True)
class Budget:
    """Ω: the largest Σω a plan may have (∞ for none) and where it came from."""

    omega: float
    source: str  # none | max_omega | max_ppl_increase | budget_from:<method>

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.omega)


def budget_from_spec(spec: SolverSpec, omega: OmegaTable, ppl_map: Any | None,
                     baseline_omega: float | None = None) -> Budget:
    """Ω from the solver config. `baseline_omega` is Σω of the `budget_from` method's plan.

    `max_ppl_increase` needs a ppl_map fitted on the same indicator as the ω table: refused otherwise.
    """
    if spec.max_omega is not None:
        if spec.max_omega < 0:
            raise ValueError(f"solver/{spec.name}.yaml: max_omega must be >= 0, got {spec.max_omega}")
        return Budget(float(spec.max_omega), "max_omega")
    if spec.max_ppl_increase is not None:
        if ppl_map is None:
            raise ValueError(f"solver/{spec.name}.yaml: max_ppl_increase needs the model's ppl_map "
                             f"(run `llmpq calibrate` and `llmpq ppl-map`), and none exists")
        if omega.source != "indicator" or getattr(ppl_map, "indicator", omega.indicator) != omega.indicator:
            raise ValueError(f"solver/{spec.name}.yaml: max_ppl_increase: the ppl_map was fitted on indicator "
                             f"{getattr(ppl_map, 'indicator', '?')!r} but the plan uses ω from "
                             f"{omega.indicator or omega.source!r}")
        return Budget(float(ppl_map.omega_budget(spec.max_ppl_increase)), "max_ppl_increase")
    if spec.budget_from is not None:
        if baseline_omega is None:
            raise ValueError(f"solver/{spec.name}.yaml: budget_from {spec.budget_from!r} needs that plan's Σω")
        return Budget(float(baseline_omega), f"budget_from:{spec.budget_from}")
    return Budget(math.inf, "none")


def ppl_map_applies(ppl_map: Any | None, omega: OmegaTable) -> bool:
    """Whether a ppl_map translates this ω table's Σω: it exists and was fitted on the table's indicator."""
    return (ppl_map is not None and omega.source == "indicator"
            and getattr(ppl_map, "indicator", None) == omega.indicator)


def ppl_increase(ppl_map: Any | None, omega: OmegaTable, omega_sum: float) -> float | None:
    """Predicted perplexity increase (%) of Σω, where a ppl_map on the same indicator exists; else None."""
    if not ppl_map_applies(ppl_map, omega):
        return None
    return float(ppl_map.predict(omega_sum))
