"""Resolve a ModelSpec to its weights directory and HF config (no torch).

`source` is one of:
- a local HF directory with `config.json` (+ safetensors weights and tokenizer to quantize and deploy),
  used as it is;
- an import source, turned into `results/models/{name}/` once by `llmpq import-model`:
  `gguf:<package>/<file>` (a GGUF file shipped inside an installed Python package) or a path ending in
  `.gguf`;
- anything else (an HF hub id): no weights here; the shape comes from the model config's `hf_config`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config.errors import ConfigError
from ..config.types import ModelSpec
from ..paths import imported_model_dir
from .dims import ModelShape
from .families import UnknownFamilyError, family
from .shape import shape_from_config

GGUF_PREFIX = "gguf:"
GGUF_SUFFIX = ".gguf"


def is_import_source(source: str) -> bool:
    """Whether `source` names a file that `llmpq import-model` converts (a GGUF), not a directory used as is."""
    return source.startswith(GGUF_PREFIX) or source.lower().endswith(GGUF_SUFFIX)


def model_dir(spec: ModelSpec, base: Path | None = None, results: str | Path = "results") -> Path | None:
    """The local HF directory of a model's weights, or None where there is none (yet).

    An import source resolves to `results/models/{name}` (relative to `base` or cwd); a directory source
    to itself. Either counts only once it holds `config.json`.
    """
    path = imported_model_dir(Path(results), spec.name) if is_import_source(spec.source) else Path(spec.source)
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return path if (path / "config.json").is_file() else None


def hf_config_dict(spec: ModelSpec, base: Path | None = None, results: str | Path = "results") -> dict:
    """The model's HF config as a dict; the spec's hf_config keys override a local config.json."""
    local = model_dir(spec, base, results)
    data = json.loads((local / "config.json").read_text()) if local else {}
    data.update(spec.hf_config or {})
    if not data:
        raise ConfigError(f"model/{spec.name}.yaml", "source",
                          f"{spec.source!r} is not a local directory with config.json and hf_config is empty")
    return data


def check_family(spec: ModelSpec, file: str, base: Path | None = None, results: str | Path = "results") -> None:
    """Refuse a model whose HF config's `model_type` is not in the family registry (the type decides the
    family everywhere; the model config's `family` key is checked against the registry on its own).

    The error names the file the type came from (the weights' config.json, else the model config). A model
    with neither a config.json nor hf_config yet (built by a rule) is not checked here.
    """
    local = model_dir(spec, base, results)
    if local is None and not spec.hf_config:
        return
    data = hf_config_dict(spec, base, results)
    origin = file if (spec.hf_config or {}).get("model_type") or local is None else str(local / "config.json")
    model_type = data.get("model_type")
    try:
        family(model_type)
    except UnknownFamilyError as exc:
        raise ConfigError(origin, "model_type", str(exc)) from None


def model_shape(spec: ModelSpec, base: Path | None = None, results: str | Path = "results") -> ModelShape:
    """ModelShape of a configured model (from config alone: no weights needed)."""
    try:
        return shape_from_config(hf_config_dict(spec, base, results))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"model/{spec.name}.yaml", "hf_config", str(exc)) from None
