"""Sensitivity indicators ω[i, b]: how much the model loses when only layer i is quantized to b bits.

- `variance` (LLM-PQ's indicator): Σ over the layer's linears of Σ_{o,k} Δ[o,k]² · Var(x_k), with Δ the
  real quantizer's step (the stored scale of the weight's group) and Var(x_k) the variance of input
  channel k over all calibration tokens. (Δ²/12 · Var is the output noise of uniform rounding error.)
- `output_error`: ‖y_q − y‖² / ‖y‖² of the real quantized layer (loaded from the store) against the
  unquantized layer's output y, on the layer's calibration inputs (those of the unquantized model).
- `kl`: mean per-token KL(p_fp ‖ p_q) of the model's next-token distribution when layer i alone is
  loaded from the store at b bits (a measured, second-order — Fisher — estimate of the loss increase).
- `loss_delta`: the increase of the mean next-token NLL (nats) on the calibration windows when layer i
  alone is loaded at b bits. Under additivity Σω estimates log(ppl_q / ppl_fp) directly; it can be
  slightly negative where quantization changes nothing measurable (noise).
- `bits_only`: 16 − b, the same for every layer (the reference a real indicator must beat).

`variance` and `output_error` need one layer at a time; `kl` and `loss_delta` run the rest of the model
after the quantized layer (layers i+1..L−1 and the head), so they cost O(L²) layer runs per bit-width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..quantize.gptq_layout import group_steps
from ..quantize.settings import LayerHeader
from .table import END_TO_END, INDICATORS

__all__ = ["END_TO_END", "INDICATORS", "EndToEnd", "EndToEndSum", "bits_only", "linear_steps", "output_error",
           "summed_nll", "variance_omega"]


def linear_steps(header: LayerHeader, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Quantization step of every weight element [out, in] of each quantized linear of a layer file."""
    return {name: group_steps(tensors[f"{name}.scales"], tensors[f"{name}.g_idx"])
            for name, q in header.linears.items() if q.quantized}


def variance_omega(steps: Mapping[str, torch.Tensor], variances: Mapping[str, torch.Tensor]) -> float:
    """Σ_linears Σ_{o,k} steps[o,k]² · var[k] (float64)."""
    return float(sum((steps[n].double().pow(2) @ variances[n].double()).sum() for n in steps))


def output_error(quantized: torch.Tensor, reference: torch.Tensor) -> float:
    """‖y_q − y‖² / ‖y‖² over all calibration tokens (float64)."""
    reference = reference.double()
    return float((quantized.double() - reference).pow(2).sum() / reference.pow(2).sum())


@dataclass(frozen=True)
class EndToEnd:
    """Effect on the model's output of one layer replaced: mean KL(p_fp ‖ p) and NLL increase, nats/token."""

    kl: float
    loss_delta: float


def summed_nll(log_probs: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of a batch ([b, seq, vocab] log-probs of ids [b, seq]) and the target count."""
    targets = ids[:, 1:]
    return float(-log_probs[:, :-1].gather(-1, targets[..., None]).sum()), targets.numel()


class EndToEndSum:
    """Running Σ KL(p_fp ‖ p_q) over tokens and Σ NLL of both models over next-token targets."""

    def __init__(self) -> None:
        self.kl = self.nll_q = self.nll_fp = 0.0
        self.tokens = self.targets = 0

    def add(self, reference: torch.Tensor, log_q: torch.Tensor, ids: torch.Tensor) -> None:
        """One batch: log-probs [b, seq, vocab] of the unquantized (`reference`) and modified models, ids [b, seq]."""
        self.kl += float((reference.exp() * (reference - log_q)).sum())
        self.tokens += ids.numel()
        q_sum, count = summed_nll(log_q, ids)
        fp_sum, _ = summed_nll(reference, ids)
        self.nll_q, self.nll_fp, self.targets = self.nll_q + q_sum, self.nll_fp + fp_sum, self.targets + count

    def result(self) -> EndToEnd:
        return EndToEnd(self.kl / self.tokens, (self.nll_q - self.nll_fp) / self.targets)


def bits_only(bits: int) -> float:
    """16 − bits."""
    return float(16 - bits)
