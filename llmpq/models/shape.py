"""Model shapes from a HF config (for planning) or from loaded weights: decoder layers, linears, params.

Nothing here assumes OPT: each family (`families.py`) maps its config keys and module names onto one
`ModelShape`.
"""

from __future__ import annotations

from typing import Any, Mapping

from .dims import LayerShape, LinearShape, ModelShape
from .families import family

__all__ = ["LayerShape", "LinearShape", "ModelShape", "decoder_layers", "layer_linears", "shape_from_config",
           "shape_from_model"]


def shape_from_config(cfg: Mapping[str, Any] | Any) -> ModelShape:
    """ModelShape from a HF config (a `PretrainedConfig` or its dict); UnknownFamilyError (a ValueError) for
    a model type the registry does not know."""
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return family(data.get("model_type")).shape(data)


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layer modules of a loaded HF causal LM, in order."""
    return list(model.get_submodule(family(model.config.model_type).layers))


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
