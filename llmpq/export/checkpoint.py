"""A plan's exact weights as one GPTQModel-format model directory (what vLLM, SGLang and GPTQModel load).

Decoder layer i comes from the store the plan names for it (`{scheme}-w{bits}/layer_{i}.safetensors`,
sha256-checked against its manifest) under its full state-dict name (`model.decoder.layers.3.fc1.qweight`,
or the base-model form when the source checkpoint uses it); every other tensor (embeddings, final norm,
an untied head) comes from the model's own checkpoint. Tensors are written as stored: quantized linears
in the GPTQ v1 layout the store keeps (int32 `qweight`/`qzeros`/`g_idx`, fp16 `scales`/`bias`, zero-points
minus one: exactly what `checkpoint_format: gptq` declares, so no conversion), everything else at the
source dtype (an engine casts to its `--dtype` at load). Shards of at most `shard_bytes` each, with
`model.safetensors.index.json` when there is more than one.

`quantize_config.json` (also config.json's `quantization_config`, where vLLM looks first): top-level bits =
the most common quantized width (ties: the higher; vLLM picks its kernel from these), group size, sym,
desc_act; `dynamic` gives every decoder layer its rule, in layer order: `-:` leaves a 16-bit layer
unquantized, `+:` sets a quantized layer's bits/group_size/sym/desc_act, preceded by a rule for any linear
whose effective group size differs from its layer's (a group spanning the whole input is written as -1,
per-channel: the same tensors). Engines take the first matching rule. A plan with no quantized layer is
written as a plain checkpoint without either.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors.torch import save_file

from .. import __version__
from ..models.families import family
from ..models.shape import LinearShape
from ..quantize.checkpoint import INDEX_FILE, SINGLE_FILE, checkpoint_keys, read_tensors
from ..quantize.loader import store_name
from ..quantize.settings import FP_BITS, LayerHeader
from ..quantize.store import LayerFileError, ManifestRow, layer_file, read_layer_file, read_layer_header, \
    read_manifest, verify_layer_file
from .engine import effective_group_size

QUANT_CONFIG_FILE = "quantize_config.json"
DEFAULT_SHARD_BYTES = 5 * 10**9   # Hugging Face's default shard size
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
               "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")


@dataclass(frozen=True)
class PlannedLayer:
    """One decoder layer as the plan places it, with the header of the store file it comes from."""

    index: int
    bits: int
    path: Path
    header: LayerHeader


@dataclass(frozen=True)
class WrittenWeights:
    """What `write_weights` put in the directory."""

    files: tuple[str, ...]
    total_bytes: int
    tensors: int


def planned_layers(bits_per_layer: Sequence[int], quant_root: Path, scheme: str, group_size: int,
                   model_type: str, verify: bool = True) -> list[PlannedLayer]:
    """Each layer's store file (sha256-checked with `verify`) and header, checked against the plan.

    LayerFileError names the file if it holds another layer, model type, scheme, bit-width or group size.
    """
    manifests: dict[int, Mapping[int, ManifestRow]] = {}
    out = []
    for index, bits in enumerate(bits_per_layer):
        store = Path(quant_root) / store_name(scheme, bits)
        if not store.is_dir():
            raise FileNotFoundError(f"{store}: no quantized store (run `llmpq quantize bits={bits}` with scheme {scheme})")
        path = layer_file(store, index)
        if verify:
            if bits not in manifests:
                manifests[bits] = read_manifest(store)
            verify_layer_file(path, manifests[bits])
        header = read_layer_header(path)
        expected = (index, model_type, scheme, bits)
        found = (header.layer, header.model_type, header.scheme, header.bits)
        if found != expected:
            raise LayerFileError(f"{path}: holds layer/model/scheme/bits {found}, the plan needs {expected}")
        groups = {q.group_size for q in header.linears.values() if q.quantized}
        if groups - {group_size}:
            raise LayerFileError(f"{path}: stored with group size {sorted(groups)}, the plan says {group_size}")
        out.append(PlannedLayer(index, bits, path, header))
    return out


def layer_root(model_dir: Path, model_type: str) -> str:
    """The decoder layers' name prefix in the source checkpoint: the causal LM's (`model.decoder.layers`)
    or, for checkpoints saved from the base model, without its first part (`decoder.layers`)."""
    full = family(model_type).layers
    base = full.split(".", 1)[1]
    keys = checkpoint_keys(model_dir)
    for root in (full, base):
        if any(k.startswith(f"{root}.0.") for k in keys):
            return root
    raise KeyError(f"{model_dir}: checkpoint has no tensors of decoder layer 0 (prefix {full!r})")


def _layer_settings(layer: PlannedLayer, linears: Sequence[LinearShape]) -> tuple[dict[str, Any], dict[str, int]]:
    """(the layer's dynamic override, effective group size per linear) of a quantized layer."""
    by_name = {lin.name: lin for lin in linears}
    groups = {name: effective_group_size(q.group_size, by_name[name].in_features)
              for name, q in layer.header.linears.items()}
    first = layer.header.linears[linears[0].name]
    override = {"bits": layer.bits, "group_size": groups[linears[0].name], "sym": first.sym, "desc_act": first.desc_act}
    return override, groups


def quantize_config(layers: Sequence[PlannedLayer], linears: Sequence[LinearShape], root: str) -> dict[str, Any] | None:
    """The GPTQModel `quantize_config.json` object of the plan (module docstring); None if nothing is quantized.

    `root` is the decoder layers' module path in the causal LM (`model.decoder.layers`): rules match module
    names of the loaded model, whatever prefix form the checkpoint's tensor names use.
    """
    quantized = [layer for layer in layers if layer.bits < FP_BITS]
    if not quantized:
        return None
    dynamic: dict[str, dict[str, Any]] = {}
    mains = []
    for layer in layers:
        prefix = re.escape(f"{root}.{layer.index}.")
        if layer.bits == FP_BITS:
            dynamic[f"-:{prefix}.*"] = {}
            continue
        override, groups = _layer_settings(layer, linears)
        mains.append((override["group_size"], override["sym"], override["desc_act"]))
        for name, group in groups.items():
            if group != override["group_size"]:
                dynamic[f"+:{prefix}{re.escape(name)}$"] = {**override, "group_size": group}
        dynamic[f"+:{prefix}.*"] = override
    counts = Counter(layer.bits for layer in quantized)
    top_bits = max(counts, key=lambda b: (counts[b], b))
    group, sym, desc_act = Counter(mains).most_common(1)[0][0]
    return {
        "bits": top_bits, "group_size": group, "sym": sym, "desc_act": desc_act, "lm_head": False,
        "quant_method": "gptq", "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32",
        "dynamic": dynamic, "meta": {"quantizer": [f"llmpq:{__version__}"]},
    }


def _shards(groups: Iterator[dict[str, torch.Tensor]], shard_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Tensors regrouped into shards of at most `shard_bytes` (a single larger tensor gets its own)."""
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for group in groups:
        for name, tensor in group.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > shard_bytes:
                yield shard
                shard, size = {}, 0
            shard[name] = tensor.contiguous()
            size += nbytes
    if shard:
        yield shard


def write_weights(out_dir: Path, model_dir: Path, layers: Sequence[PlannedLayer], model_type: str,
                  shard_bytes: int = DEFAULT_SHARD_BYTES) -> WrittenWeights:
    """Write `model.safetensors` (or shards and their index) of the non-layer tensors and the planned layers.

    Memory: the non-layer tensors, one layer and one shard at a time.
    """
    root = layer_root(model_dir, model_type)
    others = read_tensors(model_dir, lambda key: not key.startswith(f"{root}."))

    def groups() -> Iterator[dict[str, torch.Tensor]]:
        yield others
        for layer in layers:
            _, tensors = read_layer_file(layer.path)
            yield {f"{root}.{layer.index}.{name}": t for name, t in tensors.items()}

    written: list[tuple[Path, list[str]]] = []
    total = 0
    for k, shard in enumerate(_shards(groups(), shard_bytes)):
        path = out_dir / f"shard-{k}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, sorted(shard)))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    names = [SINGLE_FILE] if len(written) == 1 else \
        [f"model-{k + 1:05d}-of-{len(written):05d}.safetensors" for k in range(len(written))]
    weight_map: dict[str, str] = {}
    for (path, keys), name in zip(written, names):
        path.rename(out_dir / name)
        weight_map.update({key: name for key in keys})
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return WrittenWeights(tuple(names), total, len(weight_map))


def write_configs(out_dir: Path, model_dir: Path, quant: dict[str, Any] | None) -> list[str]:
    """config.json (with `quantization_config`), quantize_config.json, and the source's tokenizer and
    generation files; returns the names of the copied extra files."""
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    if quant is not None:
        config["quantization_config"] = quant
        (out_dir / QUANT_CONFIG_FILE).write_text(json.dumps(quant, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = [name for name in EXTRA_FILES if (model_dir / name).is_file()]
    for name in copied:
        shutil.copyfile(model_dir / name, out_dir / name)
    return copied
