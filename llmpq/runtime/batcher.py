"""Which sequences the pipeline runs next: the first stage's scheduler for a batch job of N prompts.

B cache slots hold the prompts in flight; slot groups [g·b_d, (g+1)·b_d) are the decode micro-batches.
Prompts wait in a queue, longest first (ties in input order), so that a prefill micro-batch holds prompts
of similar lengths and pads little. A sequence ends at an end-of-sequence id (`stop: eos`) or after
`max_new_tokens`. Two modes:

- `continuous` (compaction and refill): a finished sequence leaves its slot as soon as its token is back,
  and free slots are refilled from the queue at once (prefill micro-batches of at most b_p prompts over the
  free slots in slot order, issued before the decode steps of the same pass, so that on a FIFO ring they
  come back first); a group's next decode step holds only its running sequences whose last step is back,
  so a refilled row joins its group's next turn without holding it up. The pipeline keeps B sequences in
  flight until the queue runs dry.
- `static` (the deploy schedule applied wave by wave): B prompts are prefilled in micro-batches of b_p,
  each group decodes all of its rows, finished or not, until every row of the group has finished, and
  the next wave starts when the whole wave has.

A group has at most one decode step in flight and a row at most one step, so a sequence's tokens come
back in order; in static mode a group also waits for all of its rows' prefills. Everything is a function of the returned
tokens, never of timing: the same prompts and tokens give the same steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from .rows import RowLayout

MODES = ("continuous", "static")


@dataclass
class Running:
    """A sequence in a slot: its prompt index, cache columns (padding, next column) and tokens so far."""

    index: int
    pad: int = 0
    end: int = 0
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None    # eos | length once finished


@dataclass(frozen=True)
class StepSpec:
    """One micro-batch through the pipeline: its rows' layout, their prompt indices and input token ids
    (prefill: the left-padded prompts; decode: each row's last token)."""

    index: int
    phase: str
    layout: RowLayout
    sequences: tuple[int, ...]
    inputs: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Finished:
    """A sequence that has ended: its prompt index, generated ids and why it ended."""

    index: int
    tokens: tuple[int, ...]
    finish: str


class Batcher:
    """The scheduler (module docstring). `issue()` returns the steps that may start now; `complete(index,
    tokens)` takes a step's returned token ids (one per row) and returns the sequences that ended."""

    def __init__(self, prompts: Sequence[Sequence[int]], batch: int, b_p: int, b_d: int, max_new_tokens: int,
                 eos: Sequence[int] = (), mode: str = "continuous", pad_id: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if min(batch, b_p, b_d, max_new_tokens) < 1:
            raise ValueError(f"batch, b_p, b_d and max_new_tokens must be >= 1, got {batch}, {b_p}, {b_d}, "
                             f"{max_new_tokens}")
        self.prompts = [tuple(p) for p in prompts]
        if any(not p for p in self.prompts):
            raise ValueError("every prompt needs at least one token")
        self.batch, self.b_p, self.max_new = batch, b_p, max_new_tokens
        self.eos, self.mode, self.pad_id = frozenset(eos), mode, pad_id
        self.queue = deque(sorted(range(len(self.prompts)), key=lambda i: (-len(self.prompts[i]), i)))
        self.slots: list[Running | None] = [None] * batch
        self.groups = [range(g, min(g + b_d, batch)) for g in range(0, batch, b_d)]
        self.b_d = b_d
        self.pending: list[int | None] = [None] * batch      # the step in flight on each slot
        self.decoding = [False] * len(self.groups)            # a decode step of the group is in flight
        self.in_flight: dict[int, StepSpec] = {}
        self.steps = 0

    @property
    def done(self) -> bool:
        """Nothing waits, runs or is in flight."""
        return not self.queue and not self.in_flight and all(s is None for s in self.slots)

    def _new_step(self, phase: str, layout: RowLayout, sequences: list[int], inputs: list[tuple[int, ...]]) -> StepSpec:
        step = StepSpec(self.steps, phase, layout, tuple(sequences), tuple(inputs))
        self.steps += 1
        self.in_flight[step.index] = step
        for slot in layout.slots:
            self.pending[slot] = step.index
        return step

    def _decode(self, g: int) -> StepSpec | None:
        if self.mode == "continuous":
            rows = [s for s in self.groups[g] if self.slots[s] is not None and self.pending[s] is None]
        else:
            rows = [s for s in self.groups[g] if self.slots[s] is not None]
        if not rows or all(self.slots[s].finish is not None for s in rows):  # type: ignore[union-attr]
            return None
        self.decoding[g] = True
        seqs = [self.slots[s] for s in rows]
        layout = RowLayout(tuple(rows), tuple(r.pad for r in seqs), tuple(r.end for r in seqs), 1)  # type: ignore[union-attr]
        return self._new_step("decode", layout, [r.index for r in seqs], [(r.tokens[-1],) for r in seqs])  # type: ignore[union-attr]

    def _prefill(self, free: list[int]) -> list[StepSpec]:
        steps = []
        while free and self.queue:
            chunk = [(free.pop(0), self.queue.popleft()) for _ in range(min(self.b_p, len(free), len(self.queue)))]
            q = max(len(self.prompts[i]) for _, i in chunk)
            inputs, pads = [], []
            for slot, i in chunk:
                pad = q - len(self.prompts[i])
                self.slots[slot] = Running(i, pad)
                pads.append(pad)
                inputs.append((self.pad_id,) * pad + self.prompts[i])
            layout = RowLayout(tuple(s for s, _ in chunk), tuple(pads), (0,) * len(chunk), q)
            steps.append(self._new_step("prefill", layout, [i for _, i in chunk], inputs))
        return steps

    def issue(self) -> list[StepSpec]:
        """Every step that may start now: prefills into free slots, then decode steps of the idle groups."""
        if self.mode == "continuous":
            steps = self._prefill([s for s in range(self.batch) if self.slots[s] is None])
            idle = [g for g in range(len(self.groups)) if not self.decoding[g]]
        else:
            free = not self.in_flight and all(s is None for s in self.slots)
            steps = self._prefill(list(range(self.batch)) if free else [])
            idle = [g for g, group in enumerate(self.groups) if all(self.pending[s] is None for s in group)]
        return steps + [step for g in idle if (step := self._decode(g)) is not None]

    def complete(self, index: int, tokens: Sequence[int]) -> list[Finished]:
        """Apply the token ids step `index` returned (one per row); the sequences that ended with them."""
        step = self.in_flight.pop(index)
        if len(tokens) != step.layout.rows:
            raise ValueError(f"step {index} has {step.layout.rows} rows, got {len(tokens)} tokens")
        if step.phase == "decode":
            self.decoding[step.layout.slots[0] // self.b_d] = False
        ended = []
        for slot, token in zip(step.layout.slots, tokens):
            run = self.slots[slot]
            assert run is not None
            self.pending[slot] = None
            run.end = step.layout.q if step.phase == "prefill" else run.end + 1
            if run.finish is not None:
                continue
            run.tokens.append(int(token))
            if int(token) in self.eos:
                run.finish = "eos"
            elif len(run.tokens) >= self.max_new:
                run.finish = "length"
            if run.finish is not None:
                ended.append(Finished(run.index, tuple(run.tokens), run.finish))
                if self.mode == "continuous":
                    self.slots[slot] = None
        if self.mode == "static" and not self.in_flight and all(s is None or s.finish for s in self.slots):
            self.slots = [None] * self.batch
        return ended
