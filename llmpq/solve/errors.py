"""Why a solve found no plan. All are ValueErrors: the CLI prints the message (what to change) and exits
non-zero, and `llmpq solve ... infeasible=record` writes memory and budget infeasibility as the plan artifact."""

from __future__ import annotations

from typing import Any


class Infeasible(ValueError):
    """No plan exists under the configured limits; `report` is what the infeasible plan artifact records."""

    kind = "infeasible"

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report or {}


class MemoryInfeasible(Infeasible):
    """No device order, partition, bit-width and micro-batch pair fits the cluster's memory."""

    kind = "memory"


class BudgetInfeasible(Infeasible):
    """Plans fit memory, but none meets the quality budget; the message names the smallest Σω that fits."""

    kind = "budget"


class SolveTimeout(ValueError):
    """The deadline (`solver.time_limit_s`) passed before any plan was found."""


class NoCandidate(ValueError):
    """The search's plans all fail the exact cost model's memory or the budget (the MILP's model is looser)."""
