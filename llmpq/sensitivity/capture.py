"""Run the unquantized model on calibration windows and keep what the indicators need.

Hooks record, for every decoder layer and every batch, the layer's input (hidden states and the keyword
arguments the model passed: masks, positions) and output; for every linear, the running per-channel
moments of its input over all calibration tokens; and the model's log-probabilities. Everything stays in
memory (layers × tokens × hidden activations, tokens × vocab log-probabilities): sized for models that
fit the host, as the evaluator's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from ..models.families import family
from ..models.shape import layer_linears
from .moments import RunningMoments


@dataclass
class LayerCall:
    """One call of a decoder layer: its hidden-state input, other keyword arguments, and its output."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    output: torch.Tensor | None = None


@dataclass
class Capture:
    """Everything recorded on the calibration windows (batches in order)."""

    batches: list[torch.Tensor]                     # input ids per batch
    calls: list[list[LayerCall]]                    # [layer][batch]
    moments: list[dict[str, RunningMoments]]        # [layer][linear name]
    log_probs: list[torch.Tensor]                   # per batch, [b, seq, vocab] float32


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def decoder_layer_list(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of a causal LM's decoder layers (assignable, unlike `decoder_layers`' list)."""
    return model.get_submodule(family(model.config.model_type).layers)


@contextmanager
def swapped_layer(model: torch.nn.Module, index: int, layer: torch.nn.Module) -> Iterator[None]:
    """Run `model` with decoder layer `index` replaced by `layer`, restoring the original afterwards."""
    layers = decoder_layer_list(model)
    original = layers[index]
    layers[index] = layer
    try:
        yield
    finally:
        layers[index] = original


def run_layer(layer: torch.nn.Module, call: LayerCall) -> torch.Tensor:
    """Replay one recorded call on `layer` (e.g. a quantized version of the same layer)."""
    return _first(layer(call.hidden, **call.kwargs))


@torch.no_grad()
def capture(model: torch.nn.Module, windows: torch.Tensor, batch: int = 8, progress: bool = False) -> Capture:
    """Run `model` on `windows` [n, seq] in batches of `batch`, recording layer calls, moments and log-probs."""
    layers = list(decoder_layer_list(model))
    result = Capture([], [[] for _ in layers], [{} for _ in layers], [])
    handles = []

    def layer_pre(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: _detach(v) for k, v in kwargs.items() if k != "hidden_states"}
            result.calls[index].append(LayerCall(hidden.detach().clone(), rest))
        return hook

    def layer_post(index: int):
        def hook(module, args, kwargs, output):
            result.calls[index][-1].output = _first(output).detach().clone()
        return hook

    def linear_pre(index: int, name: str, channels: int):
        stats = result.moments[index].setdefault(name, RunningMoments(channels))

        def hook(module, args):
            stats.update(args[0])
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(layer_post(i), with_kwargs=True))
        for name, linear in layer_linears(layer).items():
            handles.append(linear.register_forward_pre_hook(linear_pre(i, name, linear.in_features)))
    was_training = model.training
    model.eval()
    try:
        for chunk in tqdm(windows.split(batch), desc="calibration forward", disable=not progress):
            logits = model(input_ids=chunk, use_cache=False).logits
            result.batches.append(chunk)
            result.log_probs.append(torch.log_softmax(logits.float(), dim=-1))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return result
