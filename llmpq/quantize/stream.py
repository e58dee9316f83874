"""A causal LM run one decoder layer at a time, so that host memory stays near one layer plus activations.

`LayerStream` holds the model's embedding (and, when asked, its final norm and LM head), read once from the
safetensors checkpoint, and runs any decoder layer the caller loads — the unquantized one from the
checkpoint (`fp_layer`) or a stored one at some bit-width (`stored_layer`) — on the hidden states of a set
of token windows, then frees it. Quantize (GPTQ), calibrate and perplexity all walk the model this way:
memory = embedding (+ head) + one layer + the windows' hidden states, never the whole model.

Layers are called exactly as a pipeline stage calls them (`runtime.parts.StageModel`: positions, rotary
cos/sin or ALiBi per the family registry, a preallocated KV cache), on a GPU where `device` is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..models.families import family
from ..models.shape import shape_from_config
from ..runtime.kvcache import CacheShape, StageKVCache
from ..runtime.parts import StageModel, load_ends
from .gptq_layout import densify
from .loader import DEFAULT_DTYPE, _as_config, load_checkpoint_layer, load_quantized_layer
from .store import ManifestRow

DEFAULT_BATCH = 8


class LayerStream:
    """Embedding, optional head, and one decoder layer at a time of the HF checkpoint in `model_dir`."""

    def __init__(self, model_dir: str | Path, *, head: bool, device: str | torch.device = "cpu",
                 dtype: torch.dtype = DEFAULT_DTYPE, batch: int = DEFAULT_BATCH):
        from transformers import AutoConfig

        self.model_dir = Path(model_dir)
        self.config = _as_config(AutoConfig.from_pretrained(str(model_dir)))
        self.family = family(self.config.model_type)
        self.shape = shape_from_config(self.config)
        self.device, self.dtype, self.batch, self.has_head = torch.device(device), dtype, batch, head
        self.ends, self.rotary = load_ends(model_dir, self.config, first=True, last=head, device=self.device,
                                           dtype=dtype)

    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    def _stage(self, index: int, layer: torch.nn.Module | None) -> StageModel:
        return StageModel(self.config, index, [layer] if layer is not None else [], self.ends, self.rotary,
                          self.device, self.dtype, first=True, last=self.has_head)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [n, seq, hidden] of token windows [n, seq] (positions from 0)."""
        stage = self._stage(0, None)
        return torch.cat([stage.embed(chunk.to(self.device), 0) for chunk in ids.split(self.batch)])

    def fp_layer(self, index: int) -> torch.nn.Module:
        """Decoder layer `index` with the checkpoint's unquantized weights."""
        return load_checkpoint_layer(self.config, self.model_dir, index, self.device, self.dtype)

    def stored_layer(self, store: str | Path, index: int, manifest: Mapping[int, ManifestRow] | None = None,
                     dense: bool = True, verify: bool = True) -> torch.nn.Module:
        """Decoder layer `index` from a per-layer store (sha256-verified); `dense`: quantized linears as dense
        matmuls of their exact dequantized weights (`densify`)."""
        layer = load_quantized_layer(self.config, store, index, self.device, self.dtype, verify, manifest)
        return densify(layer) if dense else layer

    @torch.no_grad()
    def forward(self, layer: torch.nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """`layer` (decoder layer `index`) on hidden states [n, seq, hidden], in batches, from position 0."""
        stage = self._stage(index, layer)
        out = []
        for chunk in hidden.split(self.batch):
            rows, seq = chunk.shape[:2]
            cache = StageKVCache(CacheShape(index, 1, rows, self.shape.kv_heads, seq, self.shape.head_dim),
                                 self.dtype, self.device)
            out.append(stage.run_layers(chunk, cache.view(range(rows), 0)))
        return torch.cat(out)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [n, seq, vocab] of final hidden states, every position (final norm, head)."""
        if not self.has_head:
            raise ValueError("this LayerStream was built without the head")
        x = hidden
        for path in self.family.head:
            module = self.ends.get(path)
            if module is not None:
                x = module(x)
        return x.float()

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 next-token log-probabilities [n, seq, vocab] of final hidden states (every position)."""
        return torch.log_softmax(self.logits(hidden), dim=-1)


def run_layers(stream: LayerStream, hidden: torch.Tensor, layers: Any) -> torch.Tensor:
    """Hidden states after every decoder layer; `layers(i)` loads layer i (freed after use)."""
    for index in range(stream.num_layers):
        hidden = stream.forward(layers(index), index, hidden)
    return hidden
