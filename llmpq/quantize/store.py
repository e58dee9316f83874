"""The per-layer quantized store: one directory per (scheme, bits) with `layer_{i}.safetensors` files and
`manifest.parquet` (the `quant_manifest` table: one row per layer with the file's sha256).

A directory is built under a temporary name beside its final path and renamed into place only when every
file and the manifest are written, so a crash never leaves a store that looks complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..artifacts import file_sha256, read_table, write_table
from .checkpoint import owned_copy
from .settings import LayerHeader

MANIFEST_FILE = "manifest.parquet"
FILE_MODE = 0o644  # stores are shared results: readable by all, as a plain `cp` would leave them


class LayerFileError(ValueError):
    """A layer file is missing, corrupted or does not match its manifest; the message names the file."""


@dataclass(frozen=True)
class ManifestRow:
    """One row of `quant_manifest`: a layer file, its size, checksum and quantization error."""

    layer: int
    bits: int
    scheme: str
    group_size: int
    file: str
    weight_bytes: int          # bytes of all tensors of the layer as stored (what the layer holds in memory)
    file_bytes: int            # size of the safetensors file (tensors + header)
    sha256: str
    weight_rel_error: float    # Σ‖W − Ŵ‖² / Σ‖W‖² over the layer's linears (dimensionless; 0 at 16 bits).
                               # Not an output error: GPTQ zeroes the weights of inputs never active in
                               # calibration (dead ReLUs into fc2), which can dominate it even at 8 bits
    seconds: float             # time spent quantizing this layer


def layer_file(store_dir: str | Path, index: int) -> Path:
    """Path of decoder layer `index` in a store directory."""
    return Path(store_dir) / f"layer_{index}.safetensors"


def write_layer_file(path: str | Path, tensors: Mapping[str, torch.Tensor], header: LayerHeader) -> int:
    """Write one layer's tensors with its header; returns the bytes of the tensors."""
    data = {name: t.detach().contiguous().clone() for name, t in sorted(tensors.items())}
    save_file(data, str(path), metadata=header.to_metadata())
    os.chmod(path, FILE_MODE)
    return sum(t.numel() * t.element_size() for t in data.values())


def read_layer_file(path: str | Path) -> tuple[LayerHeader, dict[str, torch.Tensor]]:
    """The header and tensors of one layer file (no checksum verification: see `verify_layer_file`)."""
    path = Path(path)
    if not path.is_file():
        raise LayerFileError(f"{path}: layer file not found")
    try:
        with safe_open(path, "pt") as f:
            header = LayerHeader.from_metadata(f.metadata(), str(path))
            return header, {key: owned_copy(f.get_tensor(key)) for key in f.keys()}
    except LayerFileError:
        raise
    except Exception as exc:
        raise LayerFileError(f"{path}: unreadable layer file ({exc})") from None


def read_layer_header(path: str | Path) -> LayerHeader:
    """The header of one layer file, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise LayerFileError(f"{path}: layer file not found")
    try:
        with safe_open(path, "pt") as f:
            return LayerHeader.from_metadata(f.metadata(), str(path))
    except LayerFileError:
        raise
    except Exception as exc:
        raise LayerFileError(f"{path}: unreadable layer file ({exc})") from None


def write_manifest(store_dir: str | Path, rows: list[ManifestRow], meta: Mapping[str, str]) -> Path:
    """Write `manifest.parquet` of a store directory (validated against the `quant_manifest` schema)."""
    ordered = sorted(rows, key=lambda r: r.layer)
    columns = {f.name: [getattr(r, f.name) for r in ordered] for f in fields(ManifestRow)}
    path = write_table("quant_manifest", columns, Path(store_dir) / MANIFEST_FILE, meta)
    os.chmod(path, FILE_MODE)
    return path


def read_manifest(store_dir: str | Path) -> dict[int, ManifestRow]:
    """The manifest rows of a store directory by layer index."""
    path = Path(store_dir) / MANIFEST_FILE
    if not path.is_file():
        raise LayerFileError(f"{path}: manifest not found (is {store_dir} a complete quantized store?)")
    return {int(r["layer"]): ManifestRow(**r) for r in read_table("quant_manifest", path).to_pylist()}


def verify_layer_file(path: str | Path, manifest: Mapping[int, ManifestRow] | None = None) -> ManifestRow:
    """Check a layer file's sha256 against its directory's manifest; LayerFileError naming the file if not."""
    path = Path(path)
    rows = manifest if manifest is not None else read_manifest(path.parent)
    row = next((r for r in rows.values() if r.file == path.name), None)
    if row is None:
        raise LayerFileError(f"{path}: not listed in {path.parent / MANIFEST_FILE}")
    if not path.is_file():
        raise LayerFileError(f"{path}: layer file not found (listed in the manifest)")
    actual = file_sha256(path)
    if actual != row.sha256:
        raise LayerFileError(
            f"{path}: corrupted layer file: sha256 {actual[:16]}… does not match the manifest's {row.sha256[:16]}…; "
            f"re-run `llmpq quantize` for {row.scheme} {row.bits}-bit"
        )
    return row
