"""Every Parquet table between stages: its schema, validation on write and read, atomic writes, provenance.

Column names carry their units (`latency_ms`, `memory_bytes`). A table is written only whole: to a
temporary file in the target directory, then renamed, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__

SCHEMAS: dict[str, pa.Schema] = {
    # profile: one row per timed point of one component on one device type
    "profile": pa.schema([
        # layer | embed | head | layer_hot | layer_idle | loop (per-step overheads, llmpq.profile.stage_loop)
        ("device", pa.string()), ("model", pa.string()), ("component", pa.string()),
        ("bits", pa.int16()), ("kernel", pa.string()),  # the weight kernel timed (conf/kernels.yaml); fp16 at 16 bits
        ("phase", pa.string()),  # prefill | decode
        ("batch", pa.int32()), ("q_tokens", pa.int32()), ("context_len", pa.int32()),
        ("latency_ms", pa.float64()), ("latency_ms_p10", pa.float64()), ("latency_ms_p90", pa.float64()),
        ("repeats", pa.int32()),
    ]),
    # links: measured transfer times between two ranks of a cluster's link class
    "links": pa.schema([
        ("cluster", pa.string()), ("link", pa.string()), ("payload_bytes", pa.int64()),
        ("latency_ms", pa.float64()), ("repeats", pa.int32()),
        ("load", pa.string()),  # idle (ping-pong) | busy (both ranks computing between messages, as stages do)
    ]),
    # quant_manifest: one row per (layer, bits) file of the per-layer quantized store
    "quant_manifest": pa.schema([
        ("layer", pa.int32()), ("bits", pa.int16()), ("scheme", pa.string()), ("group_size", pa.int32()),
        ("file", pa.string()), ("weight_bytes", pa.int64()), ("file_bytes", pa.int64()), ("sha256", pa.string()),
        ("weight_rel_error", pa.float64()), ("seconds", pa.float64()),  # Σ‖W−Ŵ‖²/Σ‖W‖² over the layer's linears
    ]),
    # sensitivity: ω[i, b] of each indicator
    "sensitivity": pa.schema([
        ("layer", pa.int32()), ("bits", pa.int16()), ("indicator", pa.string()), ("omega", pa.float64()),
    ]),
    # plan_layers: the per-layer view of a plan JSON
    "plan_layers": pa.schema([
        ("layer", pa.int32()), ("stage", pa.int32()), ("device", pa.string()), ("node", pa.string()),
        ("bits", pa.int16()), ("kernel", pa.string()),  # the weight kernel the layer runs on
    ]),
    # runs: what deploy measured, one row per stage and phase, with the plan's prediction beside it
    # (wall_ms: the pipeline's phase time; tokens: B·n of the whole run; see llmpq.runtime.report)
    "runs": pa.schema([
        ("method", pa.string()), ("stage", pa.int32()), ("device", pa.string()), ("node", pa.string()),
        ("phase", pa.string()),
        ("wall_ms", pa.float64()), ("predicted_ms", pa.float64()),
        ("compute_ms", pa.float64()), ("predicted_compute_ms", pa.float64()), ("wait_ms", pa.float64()),
        ("steps", pa.int32()), ("tokens", pa.int64()),
        ("throughput_tok_s", pa.float64()), ("predicted_throughput_tok_s", pa.float64()),
        ("weights_bytes", pa.int64()), ("kv_bytes", pa.int64()), ("peak_memory_bytes", pa.int64()),
        ("rss_bytes", pa.int64()), ("planned_memory_bytes", pa.int64()), ("capacity_bytes", pa.int64()),
        ("kernels", pa.string()),  # the stage's weight kernels, "bits:kernel" joined by "," (highest bits first)
        ("rss_growth_bytes", pa.int64()),  # peak RSS over the RSS just before the stage loaded anything (CPU)
        ("wall_ms_min", pa.float64()), ("wall_ms_max", pa.float64()), ("repeats", pa.int32()),  # over repetitions
        ("stage_wall_ms", pa.float64()),  # the stage's own phase time (compute + wait)
        ("device_used_bytes", pa.int64()),  # GPU: growth of the device's used memory (mem_get_info)
        ("reference_ms", pa.float64()), ("load_factor", pa.float64()),  # idle reference; / the profile's
    ]),
    # generate_runs: one row per finished `llmpq generate` run (a resumed job adds a row per run); counts
    # are this run's, tokens_per_s = generated_tokens / wall_s, predicted from the plan (llmpq.generate.run)
    "generate_runs": pa.schema([
        ("method", pa.string()), ("mode", pa.string()), ("stages", pa.int32()), ("batch", pa.int32()),
        ("micro_batch_prefill", pa.int32()), ("micro_batch_decode", pa.int32()), ("max_new_tokens", pa.int32()),
        ("prompts_total", pa.int64()), ("prompts_resumed", pa.int64()), ("prompts", pa.int64()),
        ("prompt_tokens", pa.int64()), ("generated_tokens", pa.int64()), ("eos_stops", pa.int64()),
        ("wall_s", pa.float64()), ("tokens_per_s", pa.float64()), ("prompts_per_s", pa.float64()),
        ("predicted_tokens_per_s", pa.float64()), ("rel_error", pa.float64()),
        ("steps", pa.int64()), ("compute_s", pa.float64()), ("wait_s", pa.float64()),  # steps run; Σ over stages
        ("plan_sha256", pa.string()), ("prompts_sha256", pa.string()),
    ]),
    # eval: per method, measured against predicted, and quality
    "eval": pa.schema([
        ("method", pa.string()), ("measured_tok_s", pa.float64()), ("predicted_tok_s", pa.float64()),
        ("prefill_rel_error", pa.float64()), ("decode_rel_error", pa.float64()), ("perplexity", pa.float64()),
        ("omega", pa.float64()),
        # measured tok/s over the fastest baseline of equal or worse quality (Σω or measured perplexity), and its name
        ("ratio_vs_best_baseline", pa.float64()), ("compared_with", pa.string()),
        ("plan_status", pa.string()),  # the plan's solver.status; "infeasible (memory|budget)": no plan, no numbers
        # the batch job on the workload's prompts file (llmpq generate), NaN where it has not run
        ("generate_tok_s", pa.float64()), ("generate_predicted_tok_s", pa.float64()),
        ("generate_rel_error", pa.float64()),
        # spread over the deploy's repeated runs, the largest load factor, and how the method compares (evaluate)
        ("measured_tok_s_min", pa.float64()), ("measured_tok_s_max", pa.float64()), ("repeats", pa.int32()),
        ("load_factor", pa.float64()), ("within_noise", pa.bool_()), ("identical_to", pa.string()),
        ("comparison", pa.string()),
    ]),
    # eval_stages: per method and stage, memory the plan predicted and the run measured against capacity
    "eval_stages": pa.schema([
        ("method", pa.string()), ("stage", pa.int32()), ("device", pa.string()), ("layers", pa.int32()),
        ("capacity_bytes", pa.int64()), ("predicted_bytes", pa.int64()), ("measured_peak_bytes", pa.int64()),
    ]),
}


class SchemaError(ValueError):
    """A table does not match its declared schema; names the file (if any) and the columns."""


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def schema(kind: str) -> pa.Schema:
    if kind not in SCHEMAS:
        raise KeyError(f"unknown artifact kind {kind!r} (known: {', '.join(SCHEMAS)})")
    return SCHEMAS[kind]


def check_table(kind: str, table: pa.Table, where: str = "table") -> pa.Table:
    """Return `table` cast to the schema of `kind`; raise SchemaError on missing/extra columns or bad types."""
    expected = schema(kind)
    got, want = set(table.column_names), set(expected.names)
    if got != want:
        raise SchemaError(f"{where}: {kind} columns differ: missing {sorted(want - got)}, unexpected {sorted(got - want)}")
    table = table.select(expected.names)
    for f in expected:
        actual = table.schema.field(f.name).type
        if actual != f.type and not _safe_cast(actual, f.type):
            raise SchemaError(f"{where}: {kind}.{f.name}: expected {f.type}, got {actual}")
    try:
        return table.cast(expected)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaError(f"{where}: {kind}: {exc}") from None


def _check_row_keys(kind: str, rows: list[Mapping[str, Any]], where: str) -> None:
    """Rows must carry exactly the schema's columns (from_pylist would silently drop or null the others)."""
    want = set(schema(kind).names)
    for n, row in enumerate(rows):
        got = set(row)
        if got != want:
            raise SchemaError(f"{where}: {kind} row {n}: missing {sorted(want - got)}, unexpected {sorted(got - want)}")


def _safe_cast(src: pa.DataType, dst: pa.DataType) -> bool:
    if pa.types.is_integer(src) and (pa.types.is_integer(dst) or pa.types.is_floating(dst)):
        return True
    if pa.types.is_floating(src) and pa.types.is_floating(dst):
        return True
    return pa.types.is_null(src)


def provenance(config_hash: str = "", device: str = "", **extra: Any) -> dict[str, str]:
    """Metadata stored with every artifact: versions, device and the hash of the config slice used."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = ""
    meta = {"llmpq_version": __version__, "torch_version": torch_version, "device": device, "config_hash": config_hash}
    meta.update({k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in extra.items()})
    return meta


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it replaces `final` whole.

    The directory and its top-level files get the usual shared modes (0755 / 0644; temporary directories
    are private by default), so results read like a plain copy.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield staging
        os.chmod(staging, 0o755)
        for path in staging.iterdir():
            if path.is_file():
                path.chmod(0o644)
        if final.exists():
            trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            final.rename(trash / final.name)
            staging.rename(final)
            shutil.rmtree(trash)
        else:
            staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_table(kind: str, data: pa.Table | Mapping[str, list] | list[Mapping[str, Any]], path: str | Path,
                meta: Mapping[str, str] | None = None) -> Path:
    """Validate and write one artifact table atomically, with provenance metadata under b'llmpq'."""
    if isinstance(data, pa.Table):
        table = data
    elif isinstance(data, list):
        _check_row_keys(kind, data, str(path))
        table = pa.Table.from_pylist(data, schema=schema(kind)) if data else schema(kind).empty_table()
    else:
        table = pa.table(dict(data))
    table = check_table(kind, table, str(path))
    metadata = dict(meta or provenance())
    metadata["kind"] = kind
    table = table.replace_schema_metadata({b"llmpq": json.dumps(metadata, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_table(kind: str, path: str | Path) -> pa.Table:
    """Read and validate one artifact table; raises SchemaError naming the file on mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {kind} artifact")
    table = pq.read_table(path)
    meta = read_meta(path)
    if meta.get("kind", kind) != kind:
        raise SchemaError(f"{path}: is a {meta.get('kind')} table, expected {kind}")
    return check_table(kind, table.replace_schema_metadata(None), str(path))


def read_meta(path: str | Path) -> dict[str, str]:
    """The provenance metadata of an artifact table."""
    raw = (pq.read_schema(path).metadata or {}).get(b"llmpq")
    return json.loads(raw) if raw else {}


def write_text(text: str, path: str | Path) -> Path:
    """Write a text artifact (JSON plans, reports) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
