"""`llmpq quantize bits=B`: every decoder layer of a model at B bits, as a per-layer store.

One (scheme, bits) per call and per directory, so adding a bit-width never touches the others. Schemes:
`gptq` (layer by layer on the calibration windows, `gptq.py`: one decoder layer in memory at a time),
`rtn` (round to nearest, pure torch, no calibration). `bits=16` writes the unquantized layers in the same
file format. Norms and other non-linear tensors always come from the original checkpoint, at its dtype.
Every path reads one layer's tensors at a time from the safetensors checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..artifacts import file_sha256, provenance, staged_dir
from ..config import config_hash
from ..models.shape import shape_from_config
from ..models.source import model_dir as source_dir
from ..paths import quant_dir
from ..progress import bar
from .calibration import CalibrationSpec, calibration_windows, quality_device
from .checkpoint import layer_tensors
from .gptq import QuantizedLayer, gptq_layers
from .gptq_layout import dequantize, pack_linear
from .loader import load_quantized_layer
from .rtn import rtn_dequantize, rtn_grid
from .settings import FP_BITS, SCHEMES, LayerHeader, LinearQuant
from .store import ManifestRow, layer_file, write_layer_file, write_manifest
from .stream import LayerStream

SUPPORTED_BITS = (2, 3, 4, 8, 16)


@dataclass(frozen=True)
class QuantizeJob:
    """One store to build: `model_dir` at `bits` with `scheme`, written to `out_dir`."""

    model_name: str
    model_dir: Path
    out_dir: Path
    scheme: str
    bits: int
    group_size: int = 128
    sym: bool = True
    calibration: CalibrationSpec | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r} (known: {', '.join(SCHEMES)})")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported (supported: {', '.join(map(str, SUPPORTED_BITS))})")
        if self.scheme == "gptq" and self.bits < FP_BITS and self.calibration is None:
            raise ValueError("gptq needs a calibration spec")

    def slice(self) -> dict[str, Any]:
        """The settings this store depends on (its provenance hash)."""
        calib = vars(self.calibration) if self.calibration and self.scheme == "gptq" and self.bits < FP_BITS else None
        return {"model": self.model_name, "scheme": self.scheme, "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym, "calibration": calib}


@dataclass(frozen=True)
class QuantizeReport:
    """What a job wrote: the manifest rows and the wall time."""

    out_dir: Path
    rows: tuple[ManifestRow, ...]
    seconds: float


LayerSource = Callable[[int], tuple[dict[str, torch.Tensor], LayerHeader, float]]


def _fp_source(job: QuantizeJob, model_type: str, linears: tuple[str, ...]) -> LayerSource:
    def layer(index: int) -> tuple[dict[str, torch.Tensor], LayerHeader, float]:
        start = time.perf_counter()
        tensors = layer_tensors(job.model_dir, model_type, index)
        header = LayerHeader(index, model_type, job.scheme, FP_BITS, {n: LinearQuant.fp() for n in linears})
        return tensors, header, time.perf_counter() - start
    return layer


def _rtn_source(job: QuantizeJob, model_type: str, linears: tuple[str, ...]) -> LayerSource:
    q = LinearQuant(bits=job.bits, group_size=job.group_size, sym=job.sym)

    def layer(index: int) -> tuple[dict[str, torch.Tensor], LayerHeader, float]:
        start = time.perf_counter()
        tensors = layer_tensors(job.model_dir, model_type, index)
        for name in linears:
            weight, bias = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.bias", None)
            grid = rtn_grid(weight, job.bits, job.group_size, job.sym)
            packed = pack_linear(rtn_dequantize(weight, grid, job.bits), bias, grid, q)
            tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        header = LayerHeader(index, model_type, job.scheme, job.bits, {n: q for n in linears})
        return tensors, header, time.perf_counter() - start
    return layer


LayerWriter = Callable[[int, dict[str, torch.Tensor], LayerHeader, float], Path]


def _gptq_layers(job: QuantizeJob, model_type: str, linears: tuple[str, ...], max_positions: int,
                 write: LayerWriter, device: str, progress: bool) -> None:
    """GPTQ every layer in order (`gptq_layers`), writing each with `write` before the next is loaded."""
    from transformers import AutoTokenizer

    assert job.calibration is not None
    windows = calibration_windows(AutoTokenizer.from_pretrained(str(job.model_dir)), job.calibration, max_positions)
    stream = LayerStream(job.model_dir, head=False, device=device)
    q = LinearQuant(bits=job.bits, group_size=job.group_size, sym=job.sym)

    def rebuild(result: QuantizedLayer) -> torch.nn.Module:
        tensors = layer_tensors(job.model_dir, model_type, result.index)
        for name in linears:
            tensors.pop(f"{name}.weight")
            tensors.pop(f"{name}.bias", None)
        tensors.update(result.tensors)
        header = LayerHeader(result.index, model_type, job.scheme, job.bits, {n: result.settings for n in linears})
        path = write(result.index, tensors, header, result.seconds)
        return stream.stored_layer(path, result.index, verify=False)

    for _ in bar(gptq_layers(stream, windows, q, rebuild), total=stream.num_layers, unit="layers",
                 desc=f"quantize {job.model_name} {job.scheme}-w{job.bits}", disable=not progress):
        pass


def weight_rel_error(config: Any, path: Path, index: int, original: Mapping[str, torch.Tensor],
                     linears: tuple[str, ...]) -> float:
    """Σ‖W − Ŵ‖² / Σ‖W‖² over the linears of the layer stored in `path` (Ŵ as the loader rebuilds it)."""
    layer = load_quantized_layer(config, path, index, verify=False)
    num = den = 0.0
    for name in linears:
        module = layer.get_submodule(name)
        w = original[f"{name}.weight"].float()
        w_hat = dequantize(module) if hasattr(module, "qweight") else module.weight.float()
        num += float((w - w_hat).pow(2).sum())
        den += float(w.pow(2).sum())
    return num / den if den else 0.0


def quantize_store(job: QuantizeJob, progress: bool = True, device: str = "cpu") -> QuantizeReport:
    """Build the store of `job` atomically: layer files, then `manifest.parquet` (GPTQ runs on `device`)."""
    from transformers import AutoConfig

    start = time.perf_counter()
    config = AutoConfig.from_pretrained(str(job.model_dir))
    shape = shape_from_config(config)
    linears = tuple(l.name for l in shape.layer.linears)
    rows = []
    with staged_dir(job.out_dir) as stage:

        def write(index: int, tensors: dict[str, torch.Tensor], header: LayerHeader, seconds: float) -> Path:
            path = layer_file(stage, index)
            weight_bytes = write_layer_file(path, tensors, header)
            error = 0.0 if job.bits == FP_BITS else weight_rel_error(
                config, path, index, layer_tensors(job.model_dir, config.model_type, index), linears)
            rows.append(ManifestRow(index, job.bits, job.scheme, job.group_size if job.bits < FP_BITS else -1,
                                    path.name, weight_bytes, path.stat().st_size, file_sha256(path), error, seconds))
            return path

        if job.bits == FP_BITS or job.scheme == "rtn":
            source = (_fp_source if job.bits == FP_BITS else _rtn_source)(job, config.model_type, linears)
            for index in bar(range(shape.num_layers), desc=f"quantize {job.model_name} {job.scheme}-w{job.bits}",
                             unit="layers", disable=not progress):
                write(index, *source(index))
        else:
            _gptq_layers(job, config.model_type, linears, shape.max_positions, write, device, progress)
        total = time.perf_counter() - start
        meta = provenance(config_hash(job.slice()), device=device, job=job.slice(),
                          total_seconds=f"{total:.3f}")
        write_manifest(stage, rows, meta)
    return QuantizeReport(job.out_dir, tuple(rows), time.perf_counter() - start)


def job_from_experiment(exp: Any, bits: int, results: Path, out: Path | None = None) -> QuantizeJob:
    """The quantize job of an experiment's model at `bits` (the model's `source` must hold weights)."""
    model = exp.model
    weights = source_dir(model, results=results)
    if weights is None:
        raise FileNotFoundError(f"model {model.name}: source {model.source!r} is not a local directory with weights")
    return QuantizeJob(
        model_name=model.name, model_dir=weights, scheme=model.quant.scheme, bits=bits,
        out_dir=Path(out) if out else quant_dir(results, model.name, model.quant.scheme, bits),
        group_size=model.quant.group_size, calibration=CalibrationSpec.from_raw(exp.raw["calibration"]),
    )


def cli_quantize(exp: Any, args: Any) -> int:
    """`llmpq quantize model=M bits=B [out=DIR]`: write the per-layer store of M at B bits."""
    if args.bits is None:
        raise ValueError(f"quantize needs bits=B (the model's bit-widths: {list(exp.model.bits)})")
    job = job_from_experiment(exp, args.bits, args.results, args.out)
    report = quantize_store(job, device=quality_device(exp))
    errors = ", ".join(f"{r.weight_rel_error:.2e}" for r in report.rows)
    print(f"{job.out_dir}: {len(report.rows)} layers, {job.scheme} {job.bits}-bit, {report.seconds:.1f} s; "
          f"weight relative error per layer: {errors}")
    return 0
