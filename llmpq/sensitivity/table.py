"""Read ω of one indicator from a `sensitivity` table and sum it over a per-layer bit assignment (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..artifacts import read_table

INDICATORS = ("variance", "output_error", "kl", "loss_delta", "bits_only")   # see `indicators.py`
END_TO_END = ("kl", "loss_delta")       # indicators that run the rest of the model after the quantized layer


def read_omega(path: str | Path, indicator: str) -> dict[tuple[int, int], float]:
    """ω[(layer, bits)] of one indicator from a sensitivity table; ValueError naming the file if absent."""
    table = read_table("sensitivity", path).to_pylist()
    omega = {(r["layer"], r["bits"]): r["omega"] for r in table if r["indicator"] == indicator}
    if not omega:
        known = sorted({r["indicator"] for r in table})
        raise ValueError(f"{path}: no rows for indicator {indicator!r} (has: {', '.join(known)})")
    return omega


def omega_sum(omega: Mapping[tuple[int, int], float], bits_per_layer: Sequence[int]) -> float:
    """Σ_i ω[i, bits_i] of a per-layer bit assignment."""
    try:
        return float(sum(omega[(i, int(b))] for i, b in enumerate(bits_per_layer)))
    except KeyError as exc:
        raise ValueError(f"no ω for (layer, bits) {exc.args[0]}") from None
