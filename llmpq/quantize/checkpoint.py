"""Read tensors of a Hugging Face safetensors checkpoint (single file or sharded) by name, lazily."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..models.families import family

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _files_by_key(model_dir: Path) -> dict[str, Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")
    with safe_open(single, "pt") as f:
        return {key: single for key in f.keys()}


def checkpoint_keys(model_dir: str | Path) -> list[str]:
    """Every tensor name of the checkpoint in `model_dir`, sorted (nothing is read but the headers)."""
    return sorted(_files_by_key(Path(model_dir)))


def read_tensors(model_dir: str | Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `model_dir` whose key satisfies `keep`, read from disk on demand."""
    by_file: dict[Path, list[str]] = {}
    for key, path in _files_by_key(Path(model_dir)).items():
        if keep(key):
            by_file.setdefault(path, []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with safe_open(path, "pt") as f:
            tensors.update({key: owned_copy(f.get_tensor(key)) for key in keys})
    return tensors


def owned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` copied out of the file mapping safetensors reads it from. A mapped tensor keeps the pages the kernel
    maps around it resident as long as it lives (`benchmarks/stage_memory.py`: 516 KiB of RSS for tiny-opt's
    128 KiB embedding, 136 KiB copied), which a stage's measured memory then counted beside the weights."""
    return tensor.clone()


def layer_prefix(model_type: str, index: int) -> str:
    """The state-dict prefix of decoder layer `index` in a causal LM (`model.decoder.layers.3.`)."""
    return f"{family(model_type).layers}.{index}."


def layer_tensors(model_dir: str | Path, model_type: str, index: int) -> dict[str, torch.Tensor]:
    """The tensors of decoder layer `index`, keyed relative to the layer (`fc1.weight`).

    Checkpoints saved from the base model (`decoder.layers.3.fc1.weight`, as some hub OPTs) are found too.
    """
    prefix = layer_prefix(model_type, index)
    for candidate in (prefix, prefix.split(".", 1)[1]):
        found = read_tensors(model_dir, lambda key, p=candidate: key.startswith(p))
        if found:
            return {key[len(candidate):]: value for key, value in found.items()}
    raise KeyError(f"{model_dir}: checkpoint has no tensors of decoder layer {index} (prefix {prefix!r})")
