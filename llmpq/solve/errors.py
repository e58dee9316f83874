"""The two ways a plan can be impossible; both are ValueErrors so the CLI reports them and exits non-zero."""

from __future__ import annotations


class MemoryInfeasible(ValueError):
    """No device order, partition, bit-width and micro-batch pair fits the cluster's memory."""


class BudgetInfeasible(ValueError):
    """Plans fit memory, but none meets the quality budget; the message names the smallest Σω that fits."""
