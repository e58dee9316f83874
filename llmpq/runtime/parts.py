"""The modules one pipeline stage holds, and nothing else of the model.

Decoder layers come from the quantize stage's per-layer files, each at its planned bit-width
(`load_quantized_layer`). The first stage also holds the embedding (token, positions, projection), the
last the final norm, output projection and LM head; those few tensors are read by name from the model's
safetensors checkpoint. Where the head is tied to the token embedding and the stage does not hold the
embedding, the matrix is read (and stored) again. The model's skeleton is built on the `meta` device with
no decoder layers, so nothing is allocated twice.

Per family (the registry's position kind): how ids become hidden states, which keyword arguments a
decoder layer needs (positions, rotary cos/sin, ALiBi bias and mask) and which modules make the head.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..models.families import Family, family
from ..models.shape import decoder_layers, shape_from_config
from ..quantize.checkpoint import read_tensors
from ..config.kernels import DENSE_KERNEL
from ..quantize.gptq_layout import ExllamaScratch, exllama_scratch_bytes, qlinear_class
from ..quantize.loader import decoder_layer_class, load_quantized_layer, store_name
from ..quantize.store import read_manifest
from .kvcache import CacheView
from .rows import RaggedView, RowTensors


def family_of(config: Any) -> Family:
    """The registry `Family` of a HF config; UnknownFamilyError (a ValueError) naming the known ones otherwise."""
    return family(config.model_type)


def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _skeleton(config: Any) -> torch.nn.Module:
    """The causal LM of `config` on `meta`, without decoder layers."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 0
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _read(model_dir: Path, keys: set[str], prefix: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors by model key; a checkpoint saved from the base model (keys without `prefix`) works too."""
    aliases = {k: k for k in keys}
    aliases.update({k[len(prefix):]: k for k in keys if k.startswith(prefix)})
    return {aliases[k]: v for k, v in read_tensors(model_dir, lambda k: k in aliases).items()}


def _load_ends(model_dir: Path, skeleton: torch.nn.Module, paths: Sequence[str], family: Family, tied: bool,
               device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The modules at `paths` (those the family has), filled from the checkpoint and moved to `device`/`dtype`."""
    modules = {p: m for p in paths if (m := _submodule(skeleton, p)) is not None}
    wanted = {f"{p}.{name}" for p, m in modules.items() for name in m.state_dict()}
    prefix = skeleton.base_model_prefix + "."
    found = _read(model_dir, wanted, prefix)
    head_key, token_key = f"{family.head[-1]}.weight", f"{family.embed[0]}.weight"
    if head_key in wanted and head_key not in found and tied:
        found[head_key] = found[token_key] if token_key in found else _read(model_dir, {token_key}, prefix)[token_key]
    missing = sorted(wanted - set(found))
    if missing:
        raise KeyError(f"{model_dir}: checkpoint lacks {missing}")
    for path, module in modules.items():
        state = {k[len(path) + 1:]: v for k, v in found.items() if k.startswith(path + ".")}
        module.load_state_dict(state, strict=True, assign=True)
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return modules


def _cache_keyword(layer: torch.nn.Module) -> str:
    params = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "layer_past"):
        if name in params:
            return name
    raise ValueError(f"{type(layer).__name__}.forward takes no cache argument")


class StageModel:
    """Embedding (first stage), decoder layers [start, end) and head (last stage) of one pipeline stage."""

    def __init__(self, config: Any, start: int, layers: Sequence[torch.nn.Module], ends: Mapping[str, torch.nn.Module],
                 rotary: torch.nn.Module | None, device: torch.device, dtype: torch.dtype, first: bool, last: bool,
                 scratch: ExllamaScratch | None = None):
        self.config, self.family = config, family_of(config)
        self.start, self.layers, self.ends, self.rotary = start, list(layers), dict(ends), rotary
        self.device, self.dtype, self.first, self.last = device, dtype, first, last
        self.cache_keyword = _cache_keyword(self.layers[0]) if self.layers else ""
        self.heads = config.num_attention_heads
        self.scratch = scratch  # ExLlama's scratch, kept alive with the layers that point into it

    @property
    def hidden(self) -> int:
        return self.config.hidden_size

    def modules(self) -> list[torch.nn.Module]:
        return [*self.layers, *self.ends.values(), *([self.rotary] if self.rotary is not None else [])]

    def weight_bytes(self) -> int:
        """Bytes of every parameter and buffer the stage holds (tensors sharing storage counted once)."""
        seen: dict[tuple[str, int], int] = {}
        for module in self.modules():
            for t in [*module.parameters(), *module.buffers()]:
                seen[(str(t.device), t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def embed(self, ids: torch.Tensor, pos: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [b, q, hidden] of token ids [b, q] at positions pos .. pos + q − 1, or at per-row
        `positions` [b, q] (first stage)."""
        x = self.ends[self.family.embed[0]](ids)
        if self.family.position == "learned":
            project_in = self.ends.get("model.decoder.project_in")
            if project_in is not None:
                x = project_in(x)
            if positions is None:
                positions = self._positions(ids.shape[0], ids.shape[1], pos)
            x = x + self.ends["model.decoder.embed_positions"](None, position_ids=positions)
        elif self.family.position == "alibi":
            x = self.ends["transformer.word_embeddings_layernorm"](x)
        return x

    def _positions(self, batch: int, q: int, pos: int) -> torch.Tensor:
        return torch.arange(pos, pos + q, device=self.device).expand(batch, q)

    def _layer_kwargs(self, hidden: torch.Tensor, pos: int) -> dict[str, Any]:
        batch, q = hidden.shape[:2]
        positions = self._positions(batch, q, pos)
        if self.family.position == "alibi":
            from transformers.models.bloom.modeling_bloom import build_alibi_tensor

            end = pos + q
            alibi = build_alibi_tensor(torch.ones(batch, end, device=self.device), self.heads, hidden.dtype)
            mask = torch.zeros(batch, 1, q, end, dtype=hidden.dtype, device=self.device)
            if q > 1:
                mask += torch.full((q, end), torch.finfo(hidden.dtype).min, dtype=hidden.dtype,
                                   device=self.device).triu(pos + 1)
            return {"alibi": alibi, "attention_mask": mask}
        kwargs: dict[str, Any] = {"attention_mask": None, "position_ids": positions}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, positions)
        return kwargs

    def _row_kwargs(self, hidden: torch.Tensor, rows: RowTensors) -> dict[str, Any]:
        """Layer arguments for rows of different lengths (`llmpq.runtime.rows`): per-row positions and mask."""
        mask = rows.additive_mask(hidden.dtype)
        if self.family.position == "alibi":
            from transformers.models.bloom.modeling_bloom import build_alibi_tensor

            return {"alibi": build_alibi_tensor(rows.key_valid, self.heads, hidden.dtype), "attention_mask": mask}
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": rows.positions}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, rows.positions)
        return kwargs

    def run_layers(self, hidden: torch.Tensor, cache: CacheView | RaggedView, rows: RowTensors | None = None) -> torch.Tensor:
        """The stage's decoder layers on `hidden` [b, q, hidden], reading and extending `cache`; with `rows`,
        each row at its own positions behind its own mask (a `RaggedView` cache)."""
        kwargs = self._layer_kwargs(hidden, cache.pos) if rows is None else self._row_kwargs(hidden, rows)
        kwargs[self.cache_keyword] = cache
        for layer in self.layers:
            out = layer(hidden, use_cache=True, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [b, vocab] of the last position (last stage): final norm, projection, LM head."""
        x = hidden[:, -1:]
        for path in self.family.head:
            module = self.ends.get(path)
            if module is not None:
                x = module(x)
        return x[:, -1].float()


def whole_model_stage(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> StageModel:
    """A one-stage `StageModel` over a causal LM already on `device` (all its decoder layers, embedding and head):
    the profiler runs the stage loop with it (`llmpq.profile.stage_loop`)."""
    family = family_of(model.config)
    ends = {p: m for p in family.embed + family.head if (m := _submodule(model, p)) is not None}
    rotary = _submodule(model, family.rotary) if family.rotary is not None else None
    return StageModel(model.config, 0, decoder_layers(model), ends, rotary, device, dtype, first=True, last=True)


def prepare_stage(model_dir: str | Path, quant_root: str | Path, scheme: str, bits: Sequence[int],
                  kernels: set[str], verify: bool = True) -> dict[int, Any]:
    """What loading a stage needs before its data: the model's transformers modules and skeleton (on `meta`),
    GPTQModel's kernel classes, and the stores' manifests (bits -> rows; empty without `verify`). Done before the
    stage notes its RSS, so that the growth it measures is the stage's data, not libraries and their pools."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    decoder_layer_class(config)
    _skeleton(config)
    for kernel in sorted(kernels - {DENSE_KERNEL}):
        qlinear_class(kernel)
    return {int(b): read_manifest(_store(quant_root, scheme, int(b))) for b in sorted(set(bits))} if verify else {}


def _store(quant_root: str | Path, scheme: str, bits: int) -> Path:
    store = Path(quant_root) / store_name(scheme, bits)
    if not store.is_dir():
        raise FileNotFoundError(f"{store}: no quantized store (run `llmpq quantize bits={bits}` with scheme {scheme})")
    return store


def load_stage(model_dir: str | Path, quant_root: str | Path, scheme: str, start: int, bits: Sequence[int], *,
               first: bool, last: bool, device: torch.device, dtype: torch.dtype, verify: bool = True,
               kernels: Mapping[int, str] | None = None, manifests: Mapping[int, Any] | None = None) -> StageModel:
    """The stage holding layers [start, start + len(bits)) at `bits`, from `quant_root/{scheme}-w{b}/` files, each
    quantized bit-width on its weight kernel (`kernels`: bits -> kernel; default `torch`).

    Every layer file's sha256 is checked against its store's manifest when `verify` (`manifests`: those already
    read by `prepare_stage`). A stage with ExLlama layers allocates one scratch for them first, sized for its
    largest linear (GPU only).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    kernels = dict(kernels or {})
    scratch = _exllama_scratch(config, device) if "exllama" in {kernels.get(int(b)) for b in bits} else None
    manifests = dict(manifests or {})
    layers = []
    for index, b in enumerate(bits, start=start):
        store = _store(quant_root, scheme, int(b))
        if verify and b not in manifests:
            manifests[b] = read_manifest(store)
        layers.append(load_quantized_layer(config, store, index, device, dtype, verify, manifests.get(b), kernels,
                                           scratch))
    ends, rotary = load_ends(model_dir, config, first=first, last=last, device=device, dtype=dtype)
    return StageModel(config, start, layers, ends, rotary, device, dtype, first, last, scratch)


def load_ends(model_dir: str | Path, config: Any, *, first: bool, last: bool, device: torch.device,
              dtype: torch.dtype) -> tuple[dict[str, torch.nn.Module], torch.nn.Module | None]:
    """The embedding modules (if `first`) and head modules (if `last`) read from the checkpoint, and the
    rotary-embedding module of a rotary family (else None)."""
    family = family_of(config)
    skeleton = _skeleton(config)
    paths = (family.embed if first else ()) + (family.head if last else ())
    ends = _load_ends(Path(model_dir), skeleton, paths, family, bool(getattr(config, "tie_word_embeddings", False)),
                      device, dtype)
    rotary = None
    if family.rotary is not None:
        rotary = type(_submodule(skeleton, family.rotary))(config=config).to(device)
    del skeleton
    return ends, rotary


def _exllama_scratch(config: Any, device: torch.device) -> ExllamaScratch:
    """The stage's ExLlama scratch, sized for the model's largest linear (`exllama_scratch_bytes`). GPU only."""
    shape = shape_from_config(config)
    return ExllamaScratch(exllama_scratch_bytes([(lin.in_features, lin.out_features) for lin in shape.layer.linears]),
                          device)
