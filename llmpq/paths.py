"""Where each artifact lives under the results directory (shared by the CLI and the Snakefile)."""

from __future__ import annotations

from pathlib import Path


def tiny_model_dir(results: Path) -> Path:
    return Path(results) / "models" / "tiny-opt"


def imported_model_dir(results: Path, model: str) -> Path:
    """Where `llmpq import-model` writes a model converted from its source (a GGUF file)."""
    return Path(results) / "models" / model


def profile_path(results: Path, device: str, model: str) -> Path:
    return Path(results) / "profiles" / device / f"{model}.parquet"


def links_path(results: Path, cluster: str) -> Path:
    return Path(results) / "profiles" / "links" / f"{cluster}.parquet"


def quant_root(results: Path, model: str) -> Path:
    """The directory of a model's per-layer stores, one `{scheme}-w{bits}` folder each."""
    return Path(results) / "quantized" / model


def quant_dir(results: Path, model: str, scheme: str, bits: int) -> Path:
    return quant_root(results, model) / f"{scheme}-w{bits}"


def quant_manifest_path(results: Path, model: str, scheme: str, bits: int) -> Path:
    return quant_dir(results, model, scheme, bits) / "manifest.parquet"


def sensitivity_path(results: Path, model: str) -> Path:
    return Path(results) / "sensitivity" / f"{model}.parquet"


def ppl_map_path(results: Path, model: str) -> Path:
    return Path(results) / "sensitivity" / f"{model}.ppl_map.json"


def plan_path(results: Path, model: str, cluster: str, workload: str, solver: str) -> Path:
    return Path(results) / "plans" / model / cluster / workload / f"{solver}.json"


def run_path(results: Path, model: str, cluster: str, workload: str, solver: str) -> Path:
    return Path(results) / "runs" / model / cluster / workload / f"{solver}.parquet"


def output_path(results: Path, model: str, cluster: str, workload: str, solver: str) -> Path:
    """The completions of a batch job (`llmpq generate`): one JSONL line per prompt."""
    return Path(results) / "outputs" / model / cluster / workload / f"{solver}.jsonl"


def eval_path(results: Path, model: str, cluster: str, workload: str) -> Path:
    return Path(results) / "eval" / model / cluster / f"{workload}.parquet"


def summary_path(results: Path) -> Path:
    """The one-page HTML summary of every evaluated experiment."""
    return Path(results) / "summary.html"


def export_dir(results: Path, model: str, cluster: str, workload: str, solver: str, engine: str) -> Path:
    """The model directory `llmpq export` writes for a plan and an engine."""
    return Path(results) / "export" / model / cluster / workload / f"{solver}-{engine}"
