"""A model whose decoder layers switch among stored bit-widths: each (layer, bits) file is loaded once.

For evaluating many mixed-bit assignments of a model that fits the host (ppl_map, indicator
validation): memory grows with every (layer, bits) used, so it is not for deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..models.families import family
from .loader import DEFAULT_DTYPE, load_quantized_layer, store_name
from .store import ManifestRow, read_manifest


class LayerBank:
    """The HF model of `model_dir` plus a cache of its layers loaded from `quant_root/{scheme}-w{bits}/`."""

    def __init__(self, model_dir: str | Path, quant_root: str | Path, scheme: str, dtype: torch.dtype = DEFAULT_DTYPE):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval().requires_grad_(False)
        self.quant_root, self.scheme, self.dtype = Path(quant_root), scheme, dtype
        self._layers: dict[tuple[int, int], torch.nn.Module] = {}
        self._manifests: dict[int, Mapping[int, ManifestRow]] = {}

    @property
    def num_layers(self) -> int:
        return len(self.model.get_submodule(family(self.model.config.model_type).layers))

    def layer(self, index: int, bits: int) -> torch.nn.Module:
        """Layer `index` at `bits` from the store (verified against its manifest on first load)."""
        key = (index, int(bits))
        if key not in self._layers:
            store = self.quant_root / store_name(self.scheme, int(bits))
            if int(bits) not in self._manifests:
                self._manifests[int(bits)] = read_manifest(store)
            self._layers[key] = load_quantized_layer(self.model.config, store, index, dtype=self.dtype,
                                                     manifest=self._manifests[int(bits)])
        return self._layers[key]

    def assemble(self, bits_per_layer: Sequence[int]) -> Any:
        """The model with layer i at `bits_per_layer[i]` (the same model object, re-wired)."""
        if len(bits_per_layer) != self.num_layers:
            raise ValueError(f"{len(bits_per_layer)} bit-widths given for {self.num_layers} layers")
        layers = self.model.get_submodule(family(self.model.config.model_type).layers)
        for index, bits in enumerate(bits_per_layer):
            layers[index] = self.layer(index, bits)
        return self.model
