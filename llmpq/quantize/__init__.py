"""Per-layer quantized store: GPTQ (GPTQModel) and round-to-nearest, one safetensors file per decoder layer.

Public API: `quantize_store` / `QuantizeJob` (write a store), `load_quantized_layer` (one layer from its
file alone), `load_mixed_model` (a whole model with per-layer bits), `read_manifest`, `LayerFileError`.
Importing this package does not import GPTQModel (it loads on first use, ~15 s).
"""

from .loader import DEFAULT_DTYPE, load_mixed_model, load_quantized_layer, store_name
from .settings import LayerHeader, LinearQuant
from .store import LayerFileError, ManifestRow, layer_file, read_manifest, verify_layer_file

__all__ = [
    "DEFAULT_DTYPE", "LayerFileError", "LayerHeader", "LinearQuant", "ManifestRow", "layer_file",
    "load_mixed_model", "load_quantized_layer", "read_manifest", "store_name", "verify_layer_file",
]
