"""Calibration windows: fixed-length token windows from a text source's calib split (for GPTQ and indicators)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..data.text import encode_split


@dataclass(frozen=True)
class CalibrationSpec:
    """The `calibration:` config slice: `samples` windows of `seq_len` tokens from `source`'s calib split."""

    source: str = "shakespeare"
    samples: int = 32
    seq_len: int = 128

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> "CalibrationSpec":
        return cls(source=str(raw["source"]), samples=int(raw["samples"]), seq_len=int(raw["seq_len"]))

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError(f"calibration: need samples >= 1 and seq_len >= 2, got {self.samples}, {self.seq_len}")


def quality_device(exp: Any) -> str:
    """Where quantize, calibrate and perplexity run: `calibration.device` (cpu | cuda; default cpu)."""
    device = str((exp.raw.get("calibration") or {}).get("device") or "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"calibration.device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("calibration.device is cuda but no CUDA device is visible here")
    return device


def calibration_windows(tokenizer: Any, spec: CalibrationSpec, max_positions: int | None = None) -> torch.Tensor:
    """[samples, seq_len] token ids: windows at evenly spaced offsets of the calib split (deterministic)."""
    if max_positions is not None and spec.seq_len > max_positions:
        raise ValueError(f"calibration.seq_len={spec.seq_len} exceeds the model's {max_positions} positions")
    ids = torch.tensor(encode_split(spec.source, "calib", tokenizer), dtype=torch.long)
    if len(ids) < spec.seq_len:
        raise ValueError(f"calib split of {spec.source!r} has {len(ids)} tokens, fewer than seq_len={spec.seq_len}")
    last = len(ids) - spec.seq_len
    starts = [round(k * last / max(1, spec.samples - 1)) for k in range(spec.samples)]
    return torch.stack([ids[s : s + spec.seq_len] for s in starts])
