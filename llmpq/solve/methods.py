"""Names of the planning methods (no solver imported here: evaluate and summary read them too)."""

from __future__ import annotations

BASELINES = ("pipeedge", "uniform", "adabits", "uniform-best")
METHODS = ("llmpq", "heuristic") + BASELINES


def is_baseline(name: str) -> bool:
    """Whether a plan's method (its solver config's name) is one of the baselines."""
    return name in BASELINES
