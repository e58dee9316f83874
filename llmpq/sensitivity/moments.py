"""Running per-channel mean and variance, accumulated over every batch seen (float64 sums)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RunningMoments:
    """Σx, Σx² and count per channel (last dimension) over all rows ever passed to `update`."""

    channels: int
    count: int = 0
    total: torch.Tensor = field(init=False)
    total_sq: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.channels, dtype=torch.float64)
        self.total_sq = torch.zeros(self.channels, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add every row of `x` [..., channels] (all tokens of all samples of a batch)."""
        rows = x.detach().reshape(-1, self.channels).to(torch.float64)
        self.count += rows.shape[0]
        self.total += rows.sum(0).cpu()
        self.total_sq += rows.pow(2).sum(0).cpu()

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def variance(self) -> torch.Tensor:
        """Population variance per channel over all rows (0 before any update)."""
        if self.count == 0:
            return torch.zeros(self.channels, dtype=torch.float64)
        return (self.total_sq / self.count - self.mean().pow(2)).clamp(min=0)
