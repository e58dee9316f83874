"""Model shapes from a HF config (for planning) or from loaded weights: decoder layers, linears, params.

Nothing here assumes OPT: each family maps its config keys and module names onto one `ModelShape`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class LinearShape:
    """One linear of a decoder layer: weight out_features x in_features (+ bias)."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: its quantizable linears and its (never quantized) norm parameters."""

    linears: tuple[LinearShape, ...]
    norm_params: int

    @property
    def linear_params(self) -> int:
        return sum(l.params for l in self.linears)

    @property
    def params(self) -> int:
        return self.linear_params + self.norm_params


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a decoder-only transformer; shapes come from its HF config."""

    family: str
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    layer: LayerShape
    embed_params: int          # token (+ positional, + projection, + embedding norm) parameters
    final_norm_params: int
    head_params: int           # LM head matrix (vocab x hidden), counted even when tied
    tied_head: bool

    @property
    def kv_dim(self) -> int:
        """Width of one of K or V per token per layer: kv_heads x head_dim (GQA-aware)."""
        return self.kv_heads * self.head_dim

    @property
    def params(self) -> int:
        """All parameters, the tied head counted once."""
        head = 0 if self.tied_head else self.head_params
        return self.num_layers * self.layer.params + self.embed_params + self.final_norm_params + head


def _get(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    if default is None:
        raise KeyError(f"HF config lacks all of {names}")
    return default


def _opt(cfg: Mapping[str, Any]) -> ModelShape:
    h, f = cfg["hidden_size"], cfg["ffn_dim"]
    heads = cfg["num_attention_heads"]
    bias = cfg.get("enable_bias", True)
    proj = cfg.get("word_embed_proj_dim", h) or h
    linears = tuple(LinearShape(n, h, h, bias) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"))
    linears += (LinearShape("fc1", h, f, bias), LinearShape("fc2", f, h, bias))
    affine = cfg.get("layer_norm_elementwise_affine", True)
    norm = 2 * 2 * h if affine else 0
    vocab, positions = cfg["vocab_size"], cfg["max_position_embeddings"]
    embed = vocab * proj + (positions + 2) * h + (2 * proj * h if proj != h else 0)
    final_norm = 2 * h if cfg.get("do_layer_norm_before", True) and affine else 0
    return ModelShape("opt", cfg["num_hidden_layers"], h, f, heads, heads, h // heads, vocab, positions,
                      LayerShape(linears, norm), embed, final_norm, vocab * proj, cfg.get("tie_word_embeddings", True))


def _bloom(cfg: Mapping[str, Any]) -> ModelShape:
    h = _get(cfg, "hidden_size", "n_embed")
    heads = _get(cfg, "n_head", "num_attention_heads")
    f = 4 * h
    linears = (LinearShape("self_attention.query_key_value", h, 3 * h, True), LinearShape("self_attention.dense", h, h, True),
               LinearShape("mlp.dense_h_to_4h", h, f, True), LinearShape("mlp.dense_4h_to_h", f, h, True))
    vocab = cfg["vocab_size"]
    return ModelShape("bloom", _get(cfg, "n_layer", "num_hidden_layers"), h, f, heads, heads, h // heads, vocab,
                      cfg.get("seq_length", 2048) or 2048, LayerShape(linears, 2 * 2 * h), vocab * h + 2 * h, 2 * h,
                      vocab * h, cfg.get("tie_word_embeddings", True))


def _llama(cfg: Mapping[str, Any], family: str) -> ModelShape:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    qkv_bias = cfg.get("attention_bias", family == "qwen2")
    linears = (LinearShape("self_attn.q_proj", h, heads * hd, qkv_bias), LinearShape("self_attn.k_proj", h, kv * hd, qkv_bias),
               LinearShape("self_attn.v_proj", h, kv * hd, qkv_bias), LinearShape("self_attn.o_proj", heads * hd, h, False),
               LinearShape("mlp.gate_proj", h, f, False), LinearShape("mlp.up_proj", h, f, False), LinearShape("mlp.down_proj", f, h, False))
    vocab = cfg["vocab_size"]
    return ModelShape(family, cfg["num_hidden_layers"], h, f, heads, kv, hd, vocab, cfg.get("max_position_embeddings", 4096),
                      LayerShape(linears, 2 * h), vocab * h, h, vocab * h, cfg.get("tie_word_embeddings", False))


FAMILIES = {"opt": _opt, "bloom": _bloom, "llama": lambda c: _llama(c, "llama"), "mistral": lambda c: _llama(c, "mistral"),
            "qwen2": lambda c: _llama(c, "qwen2")}


def shape_from_config(cfg: Mapping[str, Any] | Any) -> ModelShape:
    """ModelShape from a HF config (a `PretrainedConfig` or its dict); raises ValueError for unknown families."""
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported (known: {', '.join(FAMILIES)})")
    return FAMILIES[model_type](data)


DECODER_LAYERS = {"opt": "model.decoder.layers", "bloom": "transformer.h", "llama": "model.layers", "mistral": "model.layers",
                  "qwen2": "model.layers"}


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layer modules of a loaded HF causal LM, in order."""
    path = DECODER_LAYERS.get(model.config.model_type)
    if path is None:
        raise ValueError(f"model_type {model.config.model_type!r} is not supported")
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return list(obj)


def layer_linears(layer: Any) -> dict[str, Any]:
    """The quantizable linears of one decoder layer by their dotted name (torch.nn.Linear only)."""
    import torch

    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def shape_from_model(model: Any) -> ModelShape:
    """ModelShape of a loaded model, checked against its config: raises if the weights disagree."""
    shape = shape_from_config(model.config)
    for i, layer in enumerate(decoder_layers(model)):
        found = {n: (m.in_features, m.out_features, m.bias is not None) for n, m in layer_linears(layer).items()}
        expected = {l.name: (l.in_features, l.out_features, l.bias) for l in shape.layer.linears}
        if found != expected:
            raise ValueError(f"layer {i}: linears {found} differ from the config's {expected}")
    if len(decoder_layers(model)) != shape.num_layers:
        raise ValueError(f"model has {len(decoder_layers(model))} layers, config says {shape.num_layers}")
    return shape
