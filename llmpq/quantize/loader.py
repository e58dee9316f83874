"""Turn per-layer files back into modules: one decoder layer from its file alone, or a whole mixed-bit model.

A layer is built on the `meta` device (nothing allocated), its quantized linears swapped for the GPTQModel
class of their weight kernel (`TorchLinear` unless told otherwise: `torch`, `triton`, `exllama`, `marlin`,
see `gptq_layout`), then filled from the file with `load_state_dict(strict=True, assign=True)` and
finalized for that kernel (v1→v2 conversion, repacking); 16-bit linears stay `nn.Linear`.

Compute dtype: float32 by default. `TorchLinear` dequantizes the weight (exactly: fp16 scales × small
integers) into the input's dtype on every call, so float32 runs the same matmuls as the unquantized
float32 model; bfloat16 (GPTQModel's own CPU default) adds rounding of the activations and of the
dequantized weight on top of quantization. Measured on tiny-opt (whole eval split): bfloat16 moves
perplexity by at most 0.07 % at every bit-width (`benchmarks/indicator_validation.py`, `ppl_table`), so
the choice does not matter for quality there; float32 stays the default for exactness against the
unquantized model (the 16-bit store reproduces its perplexity exactly).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..models.families import family
from .checkpoint import layer_tensors
from .gptq_layout import ExllamaScratch, finalize_qlinear, new_qlinear
from .settings import LayerHeader
from .store import LayerFileError, ManifestRow, layer_file, read_layer_file, read_manifest, verify_layer_file

DEFAULT_DTYPE = torch.float32
DEFAULT_KERNEL = "torch"  # the quantized kernel every device has (the only one on a CPU)


def store_name(scheme: str, bits: int) -> str:
    """Directory name of a store under a model's quantized root (`gptq-w4`)."""
    return f"{scheme}-w{bits}"


def _as_config(model_config: Any) -> Any:
    """A private copy of a HF config (or of its dict), with an attention implementation set (the family's
    attention kind from the registry if none)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_config, PretrainedConfig):
        config = copy.deepcopy(model_config)
    else:
        data = dict(model_config)
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    if config._attn_implementation is None:
        config._attn_implementation = family(config.model_type).attention
    return config


def decoder_layer_class(config: Any) -> type:
    """The HF decoder-layer class of a config's causal LM (found through the model's `_no_split_modules`)."""
    import sys

    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    module = sys.modules[model_cls.__module__]
    names = [n for n in (model_cls._no_split_modules or []) if hasattr(module, n)]
    if not names:
        raise ValueError(f"cannot find the decoder layer class of {model_cls.__name__}")
    return getattr(module, names[0])


def empty_decoder_layer(config: Any, index: int) -> torch.nn.Module:
    """Decoder layer `index` of `config`'s model with every tensor on `meta`."""
    cls = decoder_layer_class(config)
    kwargs = {"layer_idx": index} if "layer_idx" in inspect.signature(cls.__init__).parameters else {}
    with torch.device("meta"):
        return cls(config, **kwargs)


def _swap_quantized_linears(layer: torch.nn.Module, header: LayerHeader, where: Path, kernels: Mapping[int, str],
                            dtype: torch.dtype) -> list[tuple[torch.nn.Module, str]]:
    swapped = []
    for name, q in header.linears.items():
        try:
            old = layer.get_submodule(name)
        except AttributeError:
            raise LayerFileError(f"{where}: linear {name!r} does not exist in a {header.model_type} decoder layer") from None
        if not q.quantized:
            continue
        parent_name, _, attr = name.rpartition(".")
        kernel = kernels.get(q.bits, DEFAULT_KERNEL)
        with torch.device("meta"):
            new = new_qlinear(q, old.in_features, old.out_features, old.bias is not None, kernel, dtype)
        setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, new)
        swapped.append((new, kernel))
    return swapped


def load_quantized_layer(
    model_config: Any,
    path_or_dir: str | Path,
    layer_index: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = DEFAULT_DTYPE,
    verify: bool = True,
    manifest: Mapping[int, ManifestRow] | None = None,
    kernels: Mapping[int, str] | None = None,
    scratch: ExllamaScratch | None = None,
) -> torch.nn.Module:
    """Decoder layer `layer_index` built from its file alone, in eval mode on `device`.

    `path_or_dir` is the layer file or its store directory. With `verify`, the file's sha256 is checked
    against the directory's manifest first (LayerFileError naming the file on mismatch; pass `manifest`
    to reuse one already read). `model_config` is the model's HF config (or its dict); the layer holds a
    copy, with the family's attention implementation where the config sets none. `kernels` maps bits to the weight
    kernel of the quantized linears (default `torch`); `scratch` is the stage's ExLlama scratch, if any.
    """
    path = Path(path_or_dir)
    path = layer_file(path, layer_index) if path.is_dir() else path
    if verify:
        verify_layer_file(path, manifest)
    header, tensors = read_layer_file(path)
    config = _as_config(model_config)
    if header.layer != layer_index:
        raise LayerFileError(f"{path}: holds layer {header.layer}, not layer {layer_index}")
    if header.model_type != config.model_type:
        raise LayerFileError(f"{path}: is a {header.model_type} layer, the config is {config.model_type}")
    layer = empty_decoder_layer(config, layer_index)
    qlinears = _swap_quantized_linears(layer, header, path, kernels or {}, dtype)
    try:
        layer.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise LayerFileError(f"{path}: tensors do not fit the decoder layer: {exc}") from None
    for module, kernel in qlinears:
        finalize_qlinear(module, dtype, kernel, scratch, device)
    layer.to(device)
    layer.to(dtype)
    left = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
    if left:
        raise LayerFileError(f"{path}: tensors {left} were not in the file")
    return layer.eval().requires_grad_(False)


def load_checkpoint_layer(model_config: Any, model_dir: str | Path, layer_index: int,
                          device: str | torch.device = "cpu", dtype: torch.dtype = DEFAULT_DTYPE) -> torch.nn.Module:
    """Decoder layer `layer_index` with the unquantized weights of the HF checkpoint in `model_dir`, read alone."""
    config = _as_config(model_config)
    layer = empty_decoder_layer(config, layer_index)
    layer.load_state_dict(layer_tensors(model_dir, config.model_type, layer_index), strict=True, assign=True)
    return layer.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_mixed_model(
    model_dir: str | Path,
    quant_root: str | Path,
    bits_per_layer: Sequence[int],
    scheme: str = "gptq",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = DEFAULT_DTYPE,
    verify: bool = True,
) -> torch.nn.Module:
    """The HF causal LM of `model_dir` with decoder layer i loaded from `quant_root/{scheme}-w{bits[i]}/`.

    Embeddings, final norm and head come from the original weights. Every layer, 16-bit included, comes
    from the store, so the result is exactly what a deployed plan computes. The original model is loaded
    whole first (memory: the model at `dtype` once): this is the evaluator's path; a pipeline stage loads
    its own layers with `load_quantized_layer`.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    layers = model.get_submodule(family(model.config.model_type).layers)
    if len(bits_per_layer) != len(layers):
        raise ValueError(f"{len(bits_per_layer)} bit-widths given for a model of {len(layers)} decoder layers")
    manifests: dict[int, Mapping[int, ManifestRow]] = {}
    for index, bits in enumerate(bits_per_layer):
        store = Path(quant_root) / store_name(scheme, int(bits))
        if not store.is_dir():
            raise FileNotFoundError(f"{store}: no quantized store (run `llmpq quantize bits={bits}` with scheme {scheme})")
        if verify and bits not in manifests:
            manifests[bits] = read_manifest(store)
        layers[index] = load_quantized_layer(model.config, store, index, "cpu", dtype, verify, manifests.get(bits))
    return model.to(device).eval().requires_grad_(False)
