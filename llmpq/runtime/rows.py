"""Sequences of different lengths in one micro-batch: where each row sits in the KV cache, its positions and mask.

A row of a step is one sequence in one cache slot. Its prompt is left-padded inside the cache: cache
columns [0, pad) hold padding, [pad, end) its tokens, so a prefill micro-batch of prompts of different
lengths writes one block of q columns (q = its longest prompt) and every row's last prompt token sits in
column q − 1, where the head reads it. A step writes its q new tokens of row r from column `start_r`
(prefill: 0; decode: the row's own end, so rows of one decode micro-batch may sit at different columns
after some of them joined later). Per row and query i:

- position id = start_r + i − pad_r (clamped at 0 on padding): what the model saw in training, for every
  family (OPT adds its offset of 2 in its embedding, rotary models rotate by it; ALiBi derives key
  positions from `key_valid` the same way);
- a key column c is visible iff pad_r <= c <= start_r + i (causal, padding and other rows' longer tails
  hidden): the additive mask is 0 there and the dtype's minimum elsewhere (never −inf, so a padding query
  that sees nothing stays finite).

`RaggedView` is the cache as an HF attention module sees one such step: it stores the step's keys and
values per row at the row's columns and returns columns [0, read_len) of the step's slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .kvcache import StageKVCache


@dataclass(frozen=True)
class RowLayout:
    """One step's rows: their cache slots, left padding and first written column, and q new tokens each."""

    slots: tuple[int, ...]
    pads: tuple[int, ...]
    starts: tuple[int, ...]
    q: int

    def __post_init__(self) -> None:
        if not self.slots or not len(self.slots) == len(self.pads) == len(self.starts):
            raise ValueError(f"a step needs one pad and start per slot, got {self.slots}, {self.pads}, {self.starts}")
        if self.q < 1 or any(p < 0 or p > s + self.q - 1 for p, s in zip(self.pads, self.starts)):
            raise ValueError(f"pads {self.pads} leave no token in columns starting at {self.starts} (q={self.q})")

    @property
    def rows(self) -> int:
        return len(self.slots)

    @property
    def read_len(self) -> int:
        """Cache columns the step's attention reads: [0, max_r start_r + q)."""
        return max(self.starts) + self.q


@dataclass(frozen=True)
class RowTensors:
    """A `RowLayout` as tensors on the stage's device (built once per step, shared by every layer)."""

    layout: RowLayout
    positions: torch.Tensor     # [b, q] long
    key_valid: torch.Tensor     # [b, read_len] long (1 where the row has a token)
    visible: torch.Tensor       # [b, q, read_len] bool

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[b, 1, q, read_len]: 0 where visible, the dtype's minimum elsewhere."""
        zero = torch.zeros((), dtype=dtype, device=self.visible.device)
        low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=self.visible.device)
        return torch.where(self.visible, zero, low)[:, None]


def row_tensors(layout: RowLayout, device: torch.device) -> RowTensors:
    """Positions, valid keys and the causal visibility of every query of a step (module docstring)."""
    pads = torch.tensor(layout.pads, device=device)[:, None]
    starts = torch.tensor(layout.starts, device=device)[:, None]
    query_cols = starts + torch.arange(layout.q, device=device)[None]            # [b, q]
    positions = (query_cols - pads).clamp_min(0)
    cols = torch.arange(layout.read_len, device=device)[None]                     # [1, k]
    key_valid = (cols >= pads) & (cols < starts + layout.q)                        # [b, k]
    visible = key_valid[:, None, :] & (cols[:, None, :] <= query_cols[:, :, None])
    return RowTensors(layout, positions, key_valid.long(), visible)


def _contiguous(slots: Sequence[int]) -> slice | None:
    first = slots[0]
    return slice(first, first + len(slots)) if list(slots) == list(range(first, first + len(slots))) else None


class RaggedView:
    """What an HF attention module calls for one step: `update(key, value, layer_idx)` stores the step's keys
    and values [rows, kv_heads, q, head_dim] at each row's columns and returns columns [0, read_len) of the
    step's slots. Contiguous slots are a view of the cache; scattered slots (after rows left) are gathered."""

    def __init__(self, cache: StageKVCache, layout: RowLayout):
        if layout.read_len > cache.shape.max_len:
            raise IndexError(f"a step reads {layout.read_len} columns, the cache holds {cache.shape.max_len}")
        if max(layout.slots) >= cache.shape.sequences or min(layout.slots) < 0:
            raise IndexError(f"slots {layout.slots} outside the cache's {cache.shape.sequences} sequences")
        self.cache, self.layout = cache, layout
        device = cache.keys.device
        self._span = _contiguous(layout.slots)
        self._index = torch.tensor(layout.slots, device=device)
        self._same_start = len(set(layout.starts)) == 1
        self._starts = torch.tensor(layout.starts, device=device)

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self._span] if self._span is not None else tensor.index_select(0, self._index)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = layer_idx - self.cache.shape.first_layer
        if not 0 <= layer < self.cache.shape.layers:
            raise IndexError(f"layer {layer_idx} is not held by this stage's cache")
        layout = self.layout
        for store, new in ((self.cache.keys[layer], key_states), (self.cache.values[layer], value_states)):
            if self._same_start:
                start = layout.starts[0]
                rows = self._span if self._span is not None else self._index
                store[rows, :, start:start + layout.q] = new
            elif layout.q == 1:
                store[self._index, :, self._starts] = new[:, :, 0]
            else:
                raise ValueError("rows at different columns can only take one new token per step")
        end = layout.read_len
        return (self._rows(self.cache.keys[layer])[:, :, :end], self._rows(self.cache.values[layer])[:, :, :end])
