"""Round-to-nearest weight quantization on GPTQ's grid, in plain torch (no calibration data).

Per output row and group of `group_size` inputs (`-1`: the whole row, i.e. per channel), with
`maxq = 2^bits − 1`:

- symmetric: `scale = 2·max|w| / maxq`, `zero = 2^(bits−1)`;
- asymmetric: `scale = (max(w, 0) − min(w, 0)) / maxq`, `zero = round(−min(w, 0) / scale)`;

`q = clamp(round(w / scale) + zero, 0, maxq)`, `ŵ = scale · (q − zero)`. Scales are rounded to fp16
first, as the checkpoint stores them, so the stored grid is exactly the one the codes were rounded on.
This is the quantizer GPTQ itself uses per group, without its error compensation.
"""

from __future__ import annotations

import math

import torch

from .gptq_layout import GroupQuant


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """The group of each input column: `i // group_size` (one group when `group_size` is −1)."""
    size = in_features if group_size in (-1, 0) else group_size
    return torch.arange(in_features, dtype=torch.int32) // size


def rtn_grid(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> GroupQuant:
    """Scales and zero-points [out, G] of round-to-nearest for `weight` [out, in]."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    g_idx = group_index(in_features, group_size)
    groups = int(g_idx.max()) + 1
    size = math.ceil(in_features / groups)
    padded = torch.nn.functional.pad(w, (0, groups * size - in_features)).view(out_features, groups, size)
    maxq = 2**bits - 1
    if sym:
        xmax = padded.abs().amax(dim=-1)
        scales = torch.where(xmax > 0, 2 * xmax / maxq, torch.ones_like(xmax))
        scales = scales.half().float()
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    else:
        xmin = padded.amin(dim=-1).clamp(max=0)
        xmax = padded.amax(dim=-1).clamp(min=0)
        scales = torch.where(xmax > xmin, (xmax - xmin) / maxq, torch.ones_like(xmax))
        scales = scales.half().float()
        zeros = torch.round(-xmin / scales).clamp(0, maxq)
    return GroupQuant(scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx)


def rtn_dequantize(weight: torch.Tensor, grid: GroupQuant, bits: int) -> torch.Tensor:
    """`weight` [out, in] rounded to `grid`: scale · (clamp(round(w/scale) + zero) − zero)."""
    scales = grid.scales[:, grid.g_idx.long()]
    zeros = grid.zeros[:, grid.g_idx.long()].float()
    q = torch.clamp(torch.round(weight.float() / scales) + zeros, 0, 2**bits - 1)
    return scales * (q - zeros)
