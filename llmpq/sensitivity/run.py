"""`llmpq calibrate`: ω[layer, bits] of the planner's indicator, layer by layer, from the real quantized layers.

Reads the model's weights one decoder layer at a time (`LayerStream`), the calibration windows, and the
quantized store of every bit-width below 16 (`results/quantized/{model}/{scheme}-w{bits}/`, so `quantize`
runs first); writes the `sensitivity` table (one row per layer × bits × indicator; ω = 0 at 16 bits).

Which indicators: the model config's `indicator`, else `sensitivity.indicator` of the config (default
`output_error`), and `bits_only`; or `indicator=NAME`, or `indicator=all` (what the validation benchmark
compares). For layer i, the unquantized layer runs on the unquantized model's hidden states X_i
(recording its linears' input moments for `variance`), giving Y_i = X_{i+1}; each stored bit-width of
layer i runs on the same X_i. `kl` and `loss_delta` then run layers i+1..L−1 and the head on that output
and compare with the unquantized model's log-probabilities, which are kept for the whole run (windows ×
seq × vocab × 4 bytes); they use the first `sensitivity.end_to_end_samples` windows (O(L²) layer runs
per bit-width).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..artifacts import provenance, write_table
from ..config import config_hash
from ..models.shape import layer_linears
from ..progress import bar
from ..quantize.calibration import CalibrationSpec, calibration_windows, quality_device
from ..quantize.loader import store_name
from ..quantize.settings import FP_BITS
from ..quantize.store import ManifestRow, layer_file, read_layer_file, read_manifest, verify_layer_file
from ..quantize.stream import LayerStream, run_layers
from .indicators import END_TO_END, INDICATORS, EndToEndSum, bits_only, linear_steps, output_error, variance_omega
from .moments import RunningMoments
from .ppl_map import DEFAULT_INDICATOR, configured_indicator


@dataclass(frozen=True)
class CalibrateJob:
    """Indicators to compute for a model, its store root and scheme, bits and calibration text."""

    model_name: str
    model_dir: Path
    quant_root: Path
    scheme: str
    bits: tuple[int, ...]
    calibration: CalibrationSpec
    indicators: tuple[str, ...] = (DEFAULT_INDICATOR, "bits_only")
    end_to_end_samples: int | None = None     # kl / loss_delta on the first windows only (None: all)

    def __post_init__(self) -> None:
        unknown = set(self.indicators) - set(INDICATORS)
        if unknown:
            raise ValueError(f"unknown indicators {sorted(unknown)} (known: {', '.join(INDICATORS)})")
        if self.end_to_end_samples is not None and self.end_to_end_samples < 1:
            raise ValueError(f"sensitivity.end_to_end_samples must be >= 1, got {self.end_to_end_samples}")

    def slice(self) -> dict[str, Any]:
        return {"model": self.model_name, "scheme": self.scheme, "bits": list(self.bits),
                "calibration": vars(self.calibration), "indicators": list(self.indicators),
                "end_to_end_samples": self.end_to_end_samples}


@dataclass(frozen=True)
class SensitivityRow:
    layer: int
    bits: int
    indicator: str
    omega: float


@dataclass(frozen=True)
class _Store:
    path: Path
    manifest: Mapping[int, ManifestRow]


def _moment_hooks(layer: torch.nn.Module, moments: dict[str, RunningMoments]) -> list[Any]:
    hooks = []
    for name, linear in layer_linears(layer).items():
        stats = moments.setdefault(name, RunningMoments(linear.in_features))
        hooks.append(linear.register_forward_pre_hook(lambda m, args, stats=stats: stats.update(args[0])))
    return hooks


def _end_to_end(stream: LayerStream, index: int, outputs: dict[int, torch.Tensor], windows: torch.Tensor,
                reference: Sequence[torch.Tensor]) -> dict[int, dict[str, float]]:
    """KL and NLL increase per bit-width of the model whose layer `index` produced `outputs[bits]`."""
    hidden = dict(outputs)
    for k in range(index + 1, stream.num_layers):
        layer = stream.fp_layer(k)
        hidden = {b: stream.forward(layer, k, h) for b, h in hidden.items()}
        del layer
    found = {}
    for bits, h in hidden.items():
        sums = EndToEndSum()
        for chunk, ids, ref in zip(h.split(stream.batch), windows.split(stream.batch), reference):
            sums.add(ref, stream.log_probs(chunk), ids)
        effect = sums.result()
        found[bits] = {"kl": effect.kl, "loss_delta": effect.loss_delta}
    return found


def calibrate(job: CalibrateJob, progress: bool = True, device: str = "cpu") -> list[SensitivityRow]:
    """ω of every (layer, bits, indicator) of `job` (module docstring)."""
    from transformers import AutoTokenizer

    end_to_end = bool(set(END_TO_END) & set(job.indicators))
    stream = LayerStream(job.model_dir, head=end_to_end, device=device)
    windows = calibration_windows(AutoTokenizer.from_pretrained(str(job.model_dir)), job.calibration,
                                  stream.shape.max_positions).to(stream.device)
    hidden = stream.embed(windows)
    e2e_rows = min(len(windows), job.end_to_end_samples or len(windows))
    reference: list[torch.Tensor] = []
    if end_to_end:
        final = run_layers(stream, hidden[:e2e_rows], stream.fp_layer)
        reference = [stream.log_probs(chunk) for chunk in final.split(stream.batch)]
        del final
    low = sorted((b for b in set(job.bits) if b < FP_BITS), reverse=True)
    stores = {}
    for bits in low:
        path = job.quant_root / store_name(job.scheme, bits)
        stores[bits] = _Store(path, read_manifest(path))
    rows = [SensitivityRow(i, FP_BITS, name, 0.0) for i in range(stream.num_layers) for name in job.indicators
            ] if FP_BITS in job.bits else []
    for index in bar(range(stream.num_layers), desc=f"calibrate {job.model_name} ({', '.join(job.indicators)})",
                     unit="layers", disable=not progress):
        layer = stream.fp_layer(index)
        moments: dict[str, RunningMoments] = {}
        hooks = _moment_hooks(layer, moments) if "variance" in job.indicators else []
        try:
            target = stream.forward(layer, index, hidden)
        finally:
            for hook in hooks:
                hook.remove()
        del layer
        omegas: dict[int, dict[str, float]] = {}
        outputs: dict[int, torch.Tensor] = {}
        for bits in low:
            path = layer_file(stores[bits].path, index)
            verify_layer_file(path, stores[bits].manifest)
            omegas[bits] = {"bits_only": bits_only(bits)}
            if "variance" in job.indicators:
                header, tensors = read_layer_file(path)
                omegas[bits]["variance"] = variance_omega(linear_steps(header, tensors),
                                                          {n: m.variance() for n, m in moments.items()})
            if "output_error" in job.indicators or end_to_end:
                quantized = stream.forward(stream.stored_layer(path, index, verify=False), index, hidden)
                omegas[bits]["output_error"] = output_error(quantized, target)
                if end_to_end:
                    outputs[bits] = quantized[:e2e_rows]
        if end_to_end:
            for bits, found in _end_to_end(stream, index, outputs, windows[:e2e_rows], reference).items():
                omegas[bits].update(found)
        rows += [SensitivityRow(index, bits, name, omegas[bits][name]) for bits in low for name in job.indicators]
        hidden = target
    return rows


def write_sensitivity(rows: Sequence[SensitivityRow], path: Path, meta: Mapping[str, str]) -> Path:
    """Write the `sensitivity` table."""
    columns = {name: [getattr(r, name) for r in rows] for name in ("layer", "bits", "indicator", "omega")}
    return write_table("sensitivity", columns, path, meta)


def requested_indicators(requested: str | None, configured: str) -> tuple[str, ...]:
    """The indicators to compute: `requested` (a name or `all`), else the configured one; bits_only always,
    and with an end-to-end indicator also output_error and the other end-to-end one (the same runs give them)."""
    if requested == "all":
        return INDICATORS
    name = requested or configured
    free = ("output_error", *END_TO_END) if name in END_TO_END else ()
    return tuple(dict.fromkeys((name, *free, "bits_only")))


def cli_calibrate(exp: Any, args: Any) -> int:
    """`llmpq calibrate model=M [indicator=NAME|all] [out=PATH]`: write the sensitivity table of M."""
    from ..models.source import model_dir
    from ..paths import quant_root, sensitivity_path

    weights = model_dir(exp.model, results=args.results)
    if weights is None:
        raise FileNotFoundError(f"model {exp.model.name}: source {exp.model.source!r} is not a local directory with weights")
    indicators = requested_indicators(args.indicator, configured_indicator(exp))
    samples = (exp.raw.get("sensitivity") or {}).get("end_to_end_samples")
    job = CalibrateJob(exp.model.name, weights, quant_root(args.results, exp.model.name), exp.model.quant.scheme,
                       tuple(exp.model.bits), CalibrationSpec.from_raw(exp.raw["calibration"]), indicators,
                       int(samples) if samples else None)
    device = quality_device(exp)
    rows = calibrate(job, device=device)
    out = args.out or sensitivity_path(args.results, exp.model.name)
    write_sensitivity(rows, out, provenance(config_hash(job.slice()), device=device, job=job.slice()))
    print(f"{out}: {len(rows)} rows ({', '.join(indicators)}) for {len(set(r.layer for r in rows))} layers")
    return 0
