"""Was the machine loaded? The ratio of a run's idle reference timing to its profile's (`llmpq.profile.reference`).

A deploy stage times the reference work just before its schedule; the profile timed it on a quiet machine (or
not). Their ratio is the run's load factor: above `LOADED_FACTOR` the run's timings were taken on a loaded
machine, its errors against the prediction say little, and `llmpq evaluate` withholds the ranking of plans
measured so. No torch import (the summary page uses it).
"""

from __future__ import annotations

import os

LOADED_FACTOR = 1.25   # a run whose reference took 25% longer than the profile's ran on a loaded machine


def load_factor(measured_ms: float | None, profiled_ms: float | None) -> float:
    """measured / profiled reference time; NaN where either is missing."""
    if not measured_ms or not profiled_ms:
        return float("nan")
    return measured_ms / profiled_ms


def is_loaded(factor: float) -> bool:
    """Whether a load factor says the machine was busier than when it was profiled (NaN: unknown, not loaded)."""
    return factor == factor and factor > LOADED_FACTOR


def load_average() -> dict[str, float]:
    """This machine's 1-minute load average and core count, recorded with every timing artifact (a load average
    above the core count means other processes competed for the cores while it was measured)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {"load_average": round(load, 2), "cores": float(os.cpu_count() or 1)}


def busy_machine(meta: dict) -> bool:
    """Whether an artifact's metadata says it was timed with more runnable processes than cores."""
    try:
        return float(meta["load_average"]) > float(meta["cores"])
    except (KeyError, TypeError, ValueError):
        return False
