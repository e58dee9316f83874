"""A candidate plan: a device order, micro-batches and stages, with where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from llmpq.costmodel.estimate import StageAssignment

from .plan import PLAN_SOURCES
from .tables import Slot


@dataclass(frozen=True)
class Candidate:
    """One plan the solver may return; `surrogate_ms` is its MILP objective value (F of `tables`)."""

    slots: tuple[Slot, ...]
    b_p: int
    b_d: int
    stages: tuple[StageAssignment, ...]
    source: str
    surrogate_ms: float
    layers_per_item: int = 1   # the granularity the plan was solved at (consecutive layers sharing stage and bits)
    refined_from: str = ""     # what it was refined from per layer: "grouped:<k>", "heuristic", "baseline" ("": not)

    def __post_init__(self) -> None:
        if self.source not in PLAN_SOURCES:
            raise ValueError(f"plan source {self.source!r} (known: {', '.join(PLAN_SOURCES)})")

    @property
    def bits(self) -> tuple[int, ...]:
        """Per-layer bits in layer order."""
        return tuple(b for s in self.stages for b in s.bits)

    def key(self) -> tuple:
        """A total order for deterministic tie-breaking."""
        return (PLAN_SOURCES.index(self.source), self.slots, self.b_p, self.b_d,
                tuple((s.start, s.end) for s in self.stages), self.bits)
