"""Resolve a ModelSpec to its HF config: a local directory's config.json, else the shipped hf_config."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, ModelSpec
from .shape import ModelShape, shape_from_config


def model_dir(spec: ModelSpec, base: Path | None = None) -> Path | None:
    """The local weights directory of a model, if `source` is one (relative to `base` or cwd)."""
    path = Path(spec.source)
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return path if (path / "config.json").is_file() else None


def hf_config_dict(spec: ModelSpec, base: Path | None = None) -> dict:
    """The model's HF config as a dict; the spec's hf_config keys override a local config.json."""
    local = model_dir(spec, base)
    data = json.loads((local / "config.json").read_text()) if local else {}
    data.update(spec.hf_config or {})
    if not data:
        raise ConfigError(f"model/{spec.name}.yaml", "source",
                          f"{spec.source!r} is not a local directory with config.json and hf_config is empty")
    return data


def model_shape(spec: ModelSpec, base: Path | None = None) -> ModelShape:
    """ModelShape of a configured model (from config alone: no weights needed)."""
    try:
        return shape_from_config(hf_config_dict(spec, base))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"model/{spec.name}.yaml", "hf_config", str(exc)) from None
