"""A stage's KV cache, allocated once for the whole job, and the views through which HF layers use it.

Per layer of the stage, keys and values are [K_d·b_d sequences, kv_heads, s + n, head_dim] in the compute
dtype: the design's preallocated cache (B rounded up to whole decode micro-batches, full length). A
sequence is a row, so a prefill micro-batch (b_p rows) and a decode micro-batch (b_d rows) address the
same memory and regrouping between the phases moves nothing. Every prompt has the same length s, so one
step writes its q new tokens at one position for all its rows and attends over positions [0, pos + q).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CacheShape:
    """Geometry of a stage's cache: its layers [first_layer, first_layer + layers) and one layer's tensor."""

    first_layer: int
    layers: int
    sequences: int
    kv_heads: int
    max_len: int
    head_dim: int


def cache_shape(config: Any, first_layer: int, layers: int, sequences: int, max_len: int) -> CacheShape:
    """The cache geometry of a stage of the model with HF config `config` (kv heads and head size from it)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return CacheShape(first_layer, layers, sequences, kv_heads, max_len, head_dim)


class StageKVCache:
    """Keys and values of every layer of one stage, preallocated: [layers, sequences, kv_heads, max_len, head_dim]."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str = "cpu"):
        size = (shape.layers, shape.sequences, shape.kv_heads, shape.max_len, shape.head_dim)
        self.shape = shape
        self.keys = torch.zeros(size, dtype=dtype, device=device)
        self.values = torch.zeros(size, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def view(self, rows: range, pos: int) -> "CacheView":
        """The cache as one step sees it: sequences `rows`, new tokens written from position `pos` on."""
        if rows.step != 1 or not 0 <= rows.start < rows.stop <= self.shape.sequences:
            raise ValueError(f"rows {rows} are not a contiguous range of the cache's {self.shape.sequences} sequences")
        return CacheView(self, slice(rows.start, rows.stop), pos)


class CacheView:
    """What an HF attention module calls: `update(key, value, layer_idx, ...)` stores the step's new keys and
    values (shape [rows, kv_heads, q, head_dim]) at `pos` and returns the filled prefix [0, pos + q)."""

    def __init__(self, cache: StageKVCache, rows: slice, pos: int):
        self.cache, self.rows, self.pos = cache, rows, pos

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = layer_idx - self.cache.shape.first_layer
        if not 0 <= layer < self.cache.shape.layers:
            raise IndexError(f"layer {layer_idx} is not held by this stage's cache")
        end = self.pos + key_states.shape[-2]
        if end > self.cache.shape.max_len:
            raise IndexError(f"position {end} exceeds the cache length {self.cache.shape.max_len}")
        keys = self.cache.keys[layer, self.rows]
        values = self.cache.values[layer, self.rows]
        keys[:, :, self.pos:end] = key_states
        values[:, :, self.pos:end] = value_states
        return keys[:, :, :end], values[:, :, :end]
