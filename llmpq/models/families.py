"""The family registry: everything that differs between model families, in one table (no torch).

One `Family` per HF `model_type`: how its config's keys give the `ModelShape`, where its modules live in
the HF causal LM (decoder layers, embedding modules, head modules, rotary module), how positions enter a
decoder layer (`learned` embeddings added once, `rotary` cos/sin passed to every layer, `alibi` bias and
mask passed to every layer) and whether its HF attention runs through sdpa or materialises the score
matrix (`eager`). Shapes, memory, profiling, the runtime, the quantizer and config validation all look
families up here, so adding one (Gemma, Phi, ...) is one entry; a `model_type` that is not here is
refused at config time.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

from .dims import LayerShape, LinearShape, ModelShape

PositionKind = Literal["learned", "rotary", "alibi"]
AttentionKind = Literal["sdpa", "eager"]


@dataclass(frozen=True)
class Family:
    """What is specific to one model family (see the module docstring)."""

    model_type: str
    shape: Callable[[Mapping[str, Any]], ModelShape]   # HF config dict -> ModelShape
    layers: str                    # dotted path of the decoder layers' ModuleList in the causal LM
    embed: tuple[str, ...]         # the token embedding first, then the other embedding modules
    head: tuple[str, ...]          # applied in order to the hidden states; the LM head last
    position: PositionKind
    attention: AttentionKind
    layers_key: str = "num_hidden_layers"   # the config key holding the number of decoder layers
    rotary: str | None = None      # path of the rotary-embedding module (rotary families)


class UnknownFamilyError(ValueError):
    """A `model_type` with no entry in the registry; the message names the known families."""


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


def _llama_like(family: str, qkv_bias_default: bool) -> Callable[[Mapping[str, Any]], ModelShape]:
    """Shape of a Llama-style family: GQA attention (q, k, v, o), gated MLP (gate, up, down), RMSNorms."""

    def shape(cfg: Mapping[str, Any]) -> ModelShape:
        h, f = cfg["hidden_size"], cfg["intermediate_size"]
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        hd = cfg.get("head_dim") or h // heads
        qkv_bias = cfg.get("attention_bias", qkv_bias_default)
        mlp_bias = bool(cfg.get("mlp_bias", False))
        linears = (LinearShape("self_attn.q_proj", h, heads * hd, qkv_bias), LinearShape("self_attn.k_proj", h, kv * hd, qkv_bias),
                   LinearShape("self_attn.v_proj", h, kv * hd, qkv_bias), LinearShape("self_attn.o_proj", heads * hd, h, False),
                   LinearShape("mlp.gate_proj", h, f, mlp_bias), LinearShape("mlp.up_proj", h, f, mlp_bias),
                   LinearShape("mlp.down_proj", f, h, mlp_bias))
        vocab = cfg["vocab_size"]
        return ModelShape(family, cfg["num_hidden_layers"], h, f, heads, kv, hd, vocab, cfg.get("max_position_embeddings", 4096),
                          LayerShape(linears, 2 * h), vocab * h, h, vocab * h, cfg.get("tie_word_embeddings", False))

    return shape


def _llama_family(model_type: str, qkv_bias_default: bool = False) -> Family:
    return Family(model_type, _llama_like(model_type, qkv_bias_default), "model.layers", ("model.embed_tokens",),
                  ("model.norm", "lm_head"), "rotary", "sdpa", rotary="model.rotary_emb")


FAMILIES: Mapping[str, Family] = MappingProxyType({
    "opt": Family("opt", _opt, "model.decoder.layers",
                  ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
                  ("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"), "learned", "sdpa"),
    "bloom": Family("bloom", _bloom, "transformer.h", ("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
                    ("transformer.ln_f", "lm_head"), "alibi", "eager", layers_key="n_layer"),
    "llama": _llama_family("llama"),
    "mistral": _llama_family("mistral"),
    "qwen2": _llama_family("qwen2", qkv_bias_default=True),   # Qwen2 has biases on q, k, v
})


def known_families() -> tuple[str, ...]:
    """The registered model types, sorted."""
    return tuple(sorted(FAMILIES))


def family(model_type: str | None) -> Family:
    """The registry entry of `model_type`; UnknownFamilyError naming the known families otherwise."""
    if model_type not in FAMILIES:
        raise UnknownFamilyError(f"unknown model_type {model_type!r} (known families: {', '.join(known_families())})")
    return FAMILIES[model_type]  # type: ignore[index]
