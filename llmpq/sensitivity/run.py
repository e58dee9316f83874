"""`llmpq calibrate`: ω[layer, bits] of every indicator, from calibration activations and the real quantized layers.

Reads the model's weights, the calibration windows, and the quantized store of every bit-width below 16
(`results/quantized/{model}/{scheme}-w{bits}/`, so `quantize` runs first); writes the `sensitivity`
table (one row per layer × bits × indicator; ω = 0 at 16 bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..artifacts import provenance, write_table
from ..config import config_hash
from ..quantize.calibration import CalibrationSpec, calibration_windows
from ..quantize.loader import DEFAULT_DTYPE, load_quantized_layer, store_name
from ..quantize.settings import FP_BITS
from ..quantize.store import layer_file, read_layer_file, read_manifest, verify_layer_file
from .capture import Capture, capture
from .indicators import INDICATORS, bits_only, end_to_end, linear_steps, output_error, variance_omega


@dataclass(frozen=True)
class CalibrateJob:
    """Indicators to compute for a model, its store root and scheme, bits and calibration text."""

    model_name: str
    model_dir: Path
    quant_root: Path
    scheme: str
    bits: tuple[int, ...]
    calibration: CalibrationSpec
    indicators: tuple[str, ...] = INDICATORS

    def __post_init__(self) -> None:
        unknown = set(self.indicators) - set(INDICATORS)
        if unknown:
            raise ValueError(f"unknown indicators {sorted(unknown)} (known: {', '.join(INDICATORS)})")

    def slice(self) -> dict[str, Any]:
        return {"model": self.model_name, "scheme": self.scheme, "bits": list(self.bits),
                "calibration": vars(self.calibration), "indicators": list(self.indicators)}


@dataclass(frozen=True)
class SensitivityRow:
    layer: int
    bits: int
    indicator: str
    omega: float


def _layer_omegas(job: CalibrateJob, model: torch.nn.Module, cap: Capture, store: Path,
                  manifest: Mapping[int, Any], index: int, bits: int) -> dict[str, float]:
    path = layer_file(store, index)
    verify_layer_file(path, manifest)
    header, tensors = read_layer_file(path)
    omegas = {"bits_only": bits_only(bits)}
    if "variance" in job.indicators:
        variances = {name: stats.variance() for name, stats in cap.moments[index].items()}
        omegas["variance"] = variance_omega(linear_steps(header, tensors), variances)
    if {"output_error", "kl", "loss_delta"} & set(job.indicators):
        layer = load_quantized_layer(model.config, path, index, dtype=DEFAULT_DTYPE, verify=False)
        if "output_error" in job.indicators:
            omegas["output_error"] = output_error(layer, cap.calls[index])
        if {"kl", "loss_delta"} & set(job.indicators):
            effect = end_to_end(model, cap, index, layer)
            omegas.update(kl=effect.kl, loss_delta=effect.loss_delta)
    return omegas


def calibrate(job: CalibrateJob, progress: bool = True) -> list[SensitivityRow]:
    """ω of every (layer, bits, indicator) of `job`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(job.model_dir), dtype=DEFAULT_DTYPE).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(job.model_dir))
    windows = calibration_windows(tokenizer, job.calibration, model.config.max_position_embeddings)
    cap = capture(model, windows, progress=progress)
    num_layers = len(cap.calls)
    rows = []
    for bits in sorted(set(job.bits), reverse=True):
        if bits == FP_BITS:
            rows += [SensitivityRow(i, bits, name, 0.0) for i in range(num_layers) for name in job.indicators]
            continue
        store = job.quant_root / store_name(job.scheme, bits)
        manifest = read_manifest(store)
        for index in tqdm(range(num_layers), desc=f"indicators {bits}-bit", disable=not progress):
            omegas = _layer_omegas(job, model, cap, store, manifest, index, bits)
            rows += [SensitivityRow(index, bits, name, omegas[name]) for name in job.indicators]
    return rows


def write_sensitivity(rows: Sequence[SensitivityRow], path: Path, meta: Mapping[str, str]) -> Path:
    """Write the `sensitivity` table."""
    columns = {name: [getattr(r, name) for r in rows] for name in ("layer", "bits", "indicator", "omega")}
    return write_table("sensitivity", columns, path, meta)


def cli_calibrate(exp: Any, args: Any) -> int:
    """`llmpq calibrate model=M [indicator=NAME] [out=PATH]`: write the sensitivity table of M."""
    from ..models.source import model_dir
    from ..paths import quant_root, sensitivity_path

    weights = model_dir(exp.model, results=args.results)
    if weights is None:
        raise FileNotFoundError(f"model {exp.model.name}: source {exp.model.source!r} is not a local directory with weights")
    scheme = exp.model.quant.scheme
    indicators = (args.indicator,) if args.indicator else INDICATORS
    if "bits_only" not in indicators:
        indicators += ("bits_only",)
    job = CalibrateJob(exp.model.name, weights, quant_root(args.results, exp.model.name), scheme,
                       tuple(exp.model.bits), CalibrationSpec.from_raw(exp.raw["calibration"]), indicators)
    rows = calibrate(job)
    out = args.out or sensitivity_path(args.results, exp.model.name)
    write_sensitivity(rows, out, provenance(config_hash(job.slice()), device="cpu", job=job.slice()))
    print(f"{out}: {len(rows)} rows ({', '.join(indicators)}) for {len(set(r.layer for r in rows))} layers")
    return 0
