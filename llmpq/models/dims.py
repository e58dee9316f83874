"""The shape of a decoder-only transformer: its linears, layers and ends, as the cost model sees them.

Plain data, no torch: `families.py` fills these from each family's HF config keys.
"""

from __future__ import annotations

from dataclasses import dataclass


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

