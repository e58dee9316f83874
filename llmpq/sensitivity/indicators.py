"""Sensitivity indicators ω[i, b]: how much the model loses when only layer i is quantized to b bits.

- `variance` (LLM-PQ's indicator): Σ over the layer's linears of Σ_{o,k} Δ[o,k]² · Var(x_k), with Δ the
  real quantizer's step (the stored scale of the weight's group) and Var(x_k) the variance of input
  channel k over all calibration tokens. (Δ²/12 · Var is the output noise of uniform rounding error.)
- `output_error`: ‖y_q − y‖² / ‖y‖² of the real quantized layer (loaded from the store) against the
  unquantized layer's output y, on the layer's recorded calibration inputs.
- `kl`: mean per-token KL(p_fp ‖ p_q) of the model's next-token distribution when layer i alone is
  loaded from the store at b bits (a measured, second-order — Fisher — estimate of the loss increase).
- `loss_delta`: the increase of the mean next-token NLL (nats) on the calibration windows when layer i
  alone is loaded at b bits. Under additivity Σω estimates log(ppl_q / ppl_fp) directly; it can be
  slightly negative where quantization changes nothing measurable (noise).
- `bits_only`: 16 − b, the same for every layer (the reference a real indicator must beat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..quantize.gptq_layout import group_steps
from ..quantize.settings import LayerHeader
from .capture import Capture, LayerCall, run_layer, swapped_layer

INDICATORS = ("variance", "output_error", "kl", "loss_delta", "bits_only")


def linear_steps(header: LayerHeader, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Quantization step of every weight element [out, in] of each quantized linear of a layer file."""
    return {name: group_steps(tensors[f"{name}.scales"], tensors[f"{name}.g_idx"])
            for name, q in header.linears.items() if q.quantized}


def variance_omega(steps: Mapping[str, torch.Tensor], variances: Mapping[str, torch.Tensor]) -> float:
    """Σ_linears Σ_{o,k} steps[o,k]² · var[k] (float64)."""
    return float(sum((steps[n].double().pow(2) @ variances[n].double()).sum() for n in steps))


@torch.no_grad()
def output_error(layer: torch.nn.Module, calls: Sequence[LayerCall]) -> float:
    """Σ‖layer(x) − y‖² / Σ‖y‖² over recorded calls (x, y) of the unquantized layer."""
    num = den = 0.0
    for call in calls:
        assert call.output is not None
        reference = call.output.double()
        num += float((run_layer(layer, call).double() - reference).pow(2).sum())
        den += float(reference.pow(2).sum())
    return num / den


@dataclass(frozen=True)
class EndToEnd:
    """Effect on the model's output of one layer replaced: mean KL(p_fp ‖ p) and NLL increase, nats/token."""

    kl: float
    loss_delta: float


def summed_nll(log_probs: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of a batch ([b, seq, vocab] log-probs of ids [b, seq]) and the target count."""
    targets = ids[:, 1:]
    return float(-log_probs[:, :-1].gather(-1, targets[..., None]).sum()), targets.numel()


@torch.no_grad()
def end_to_end(model: torch.nn.Module, cap: Capture, index: int, layer: torch.nn.Module) -> EndToEnd:
    """KL and NLL increase of `model` with decoder layer `index` replaced by `layer`, on the captured windows."""
    kl = nll_q = nll_fp = 0.0
    tokens = targets = 0
    with swapped_layer(model, index, layer):
        for chunk, reference in zip(cap.batches, cap.log_probs):
            log_q = torch.log_softmax(model(input_ids=chunk, use_cache=False).logits.float(), dim=-1)
            kl += float((reference.exp() * (reference - log_q)).sum())
            tokens += chunk.numel()
            q_sum, count = summed_nll(log_q, chunk)
            fp_sum, _ = summed_nll(reference, chunk)
            nll_q, nll_fp, targets = nll_q + q_sum, nll_fp + fp_sum, targets + count
    return EndToEnd(kl / tokens, (nll_q - nll_fp) / targets)


def bits_only(bits: int) -> float:
    """16 − bits."""
    return float(16 - bits)
