"""The schedule every stage runs: prefill micro-batches, a barrier, then n − 1 decode rounds.

Steps, in the same order on every stage: K_p prefill micro-batches of b_p prompts (s new tokens at
position 0; the last stage's greedy token is the first generated one), then rounds k = 1..n−1 of K_d
decode micro-batches of b_d sequences (one new token at position s + k − 1). A step on a stage: the first
embeds token ids, every stage runs its layers over its KV cache, the last computes last-position logits
and the greedy token; hidden states go to the next stage and token ids back to the first (the ring).
A decode micro-batch starts round k when its round k − 1 token has come back, so stages overlap on
different micro-batches exactly as the cost model's ring pipeline assumes; the barrier between the phases
is the one the cost model assumes too. A one-stage pipeline runs the same steps without messages.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..costmodel.memory import POSTED_MESSAGES
from .comm import Pending, Ring
from .kvcache import StageKVCache
from .measure import PHASES, StageClock
from .parts import StageModel

FAULT_MODES = ("exit", "hang")
FAULT_EXIT_CODE = 17
WARMUP_CALLS = 3  # untimed calls of the first shape per phase and micro-batch size (every shape gets one)


@dataclass(frozen=True)
class Step:
    """One micro-batch through the pipeline: sequences `rows`, `q` new tokens each from position `pos`."""

    index: int          # position in the schedule; tags the step's messages
    phase: str          # prefill | decode
    round: int          # 0 for prefill, k = 1..n−1 for decode; the step yields generated token `round`
    rows: range
    pos: int
    q: int


def micro_batches(batch: int, size: int) -> list[range]:
    """Rows of each micro-batch of `size` over `batch` sequences (the last may be smaller)."""
    if batch < 1 or size < 1:
        raise ValueError(f"batch and micro-batch size must be >= 1, got {batch} and {size}")
    return [range(start, min(batch, start + size)) for start in range(0, batch, size)]


def prime_stage(model: StageModel, device: torch.device, dtype: torch.dtype) -> None:
    """One prefill and one decode step of `model` over a one-sequence cache, untimed: the first call of every code
    path a step takes (the family's layer, each weight kernel, embedding and head) imports and caches what it
    needs. A CPU stage runs this on a throwaway copy of its first layers before noting its RSS, so that its RSS
    growth is the stage's data, not the libraries' one-time allocations."""
    from .kvcache import StageKVCache, cache_shape

    cache = StageKVCache(cache_shape(model.config, model.start, len(model.layers), 1, 4), dtype, device)
    runner = StageRunner(model, cache, StageClock(device), 1, 2)
    for step in plan_steps(1, 2, 2, 1, 1):
        runner._compute(step, runner._dummy_input(step))


def plan_steps(batch: int, prompt_len: int, gen_len: int, b_p: int, b_d: int) -> tuple[Step, ...]:
    """The whole schedule: K_p prefill steps, then n − 1 rounds of K_d decode steps."""
    steps = [Step(i, "prefill", 0, rows, 0, prompt_len) for i, rows in enumerate(micro_batches(batch, b_p))]
    for k in range(1, gen_len):
        for rows in micro_batches(batch, b_d):
            steps.append(Step(len(steps), "decode", k, rows, prompt_len + k - 1, 1))
    return tuple(steps)


@dataclass(frozen=True)
class Fault:
    """A test hook: rank `rank` exits (a crash) or hangs (a peer that stops answering) at its first step of
    round `round` (0 = prefill). Written `rank:round:mode`."""

    rank: int
    round: int
    mode: str

    @staticmethod
    def parse(text: str) -> "Fault":
        try:
            rank, rnd, mode = text.split(":")
            fault = Fault(int(rank), int(rnd), mode)
        except ValueError:
            raise ValueError(f"fault {text!r}: expected RANK:ROUND:MODE, e.g. 1:2:exit") from None
        if mode not in FAULT_MODES:
            raise ValueError(f"fault {text!r}: mode must be one of {', '.join(FAULT_MODES)}")
        return fault

    def strike(self) -> None:
        print(f"llmpq stage {self.rank}: injected fault '{self.mode}' at round {self.round}", file=sys.stderr,
              flush=True)
        if self.mode == "exit":
            os._exit(FAULT_EXIT_CODE)
        threading.Event().wait()


@dataclass(frozen=True)
class StageOutput:
    """What a stage returns: generated ids [B, n] (first stage) and, if recorded, float32 logits [B, vocab] of the
    first and last generated token (last stage)."""

    tokens: torch.Tensor | None
    first_logits: torch.Tensor | None
    last_logits: torch.Tensor | None


class StageRunner:
    """Runs the schedule on one stage: its model and KV cache, its ring links (None for a one-stage pipeline).

    Hidden-state receives are posted ahead, `POSTED_MESSAGES` (2) at a time per phase, so that a message
    rarely arrives before its receive (gloo holds back a small message that arrives unexpected by one kernel
    timer tick, 4 ms here, longer than a whole decode step of a small stage) while the buffers stay bounded:
    the memory model counts exactly these two (`costmodel.memory.buffers_bytes`). The first stage posts one
    token-id receive per micro-batch in flight (8 bytes per sequence). Warm-up, untimed and without messages,
    runs every distinct step shape of the schedule once (a new context length is a new attention shape: on a
    GPU its first call picks kernels and loads them) and the first shape of each phase and micro-batch size
    `WARMUP_CALLS` times, so one-time costs stay out of the measurement as the profiler's warm-up calls keep
    them out of the prediction. Each step is one compute block of the clock (`StageClock`): the stage's own
    work, its sampling and the posting of its messages; blocking on a peer is wait time.
    """

    def __init__(self, model: StageModel, cache: StageKVCache, clock: StageClock, batch: int, gen_len: int,
                 ring: Ring | None = None, fault: Fault | None = None, record_logits: bool = False):
        self.model, self.cache, self.clock, self.ring = model, cache, clock, ring
        rank = ring.rank if ring else 0
        self.fault = fault if fault is not None and fault.rank == rank else None
        self.gen_len = gen_len
        device = model.device
        self.tokens = torch.zeros(batch, gen_len, dtype=torch.long, device=device) if model.first else None
        record = record_logits and model.last
        vocab = model.config.vocab_size
        self.first_logits = torch.zeros(batch, vocab) if record else None
        self.last_logits = torch.zeros(batch, vocab) if record else None

    def warm_up(self, steps: Sequence[Step]) -> int:
        """Untimed calls (class docstring); how many were made."""
        shapes = {(s.phase, len(s.rows), s.q, s.pos): s for s in steps}
        firsts = {(s.phase, len(s.rows)): s for s in reversed(steps)}
        calls = [*shapes.values(), *(s for s in firsts.values() for _ in range(WARMUP_CALLS - 1))]
        for step in calls:
            self._compute(step, self._dummy_input(step))
        self.clock.sync()
        return len(calls)

    def run(self, prompts: torch.Tensor, steps: Sequence[Step], warmup: bool = True, repeats: int = 1,
            memory_pass: Callable[[], None] | None = None) -> tuple[StageOutput, list[dict[str, dict[str, float]]]]:
        """Run every step `repeats` times (after the warm-up); `prompts` [B, s] token ids (read by the first stage
        only). The output of the last repetition and each repetition's clock (`StageClock.to_dict`). With
        `memory_pass`, one more repetition runs first, untimed, and `memory_pass()` is called after it: a CPU stage
        measures its memory over that repetition in the allocator mode that makes RSS follow live memory, then
        switches to the fast mode for the timed ones (`llmpq.runtime.measure.return_freed_memory`)."""
        by_phase = {p: [s for s in steps if s.phase == p] for p in PHASES}
        if warmup:
            self.warm_up(steps)
        if memory_pass is not None:
            self._repetition(prompts, by_phase)
            memory_pass()
        clocks = [self._repetition(prompts, by_phase) for _ in range(repeats)]
        return StageOutput(self.tokens, self.first_logits, self.last_logits), clocks

    def _repetition(self, prompts: torch.Tensor, by_phase: dict[str, list[Step]]) -> dict[str, dict[str, float]]:
        """One run of the whole schedule on a fresh clock: each phase after a barrier, its receives posted ahead."""
        self.clock = StageClock(self.clock.device)
        if self.ring is not None:
            self.ring.clock = self.clock
        for phase, phase_steps in by_phase.items():
            if not phase_steps:
                continue
            inbox = self._post_ahead(phase_steps)
            if self.ring is not None:
                self.ring.barrier()
            with self.clock.phase(phase):
                self._run_phase(phase, phase_steps, prompts, inbox)
        return self.clock.to_dict()

    def _dummy_input(self, step: Step) -> torch.Tensor:
        shape = (len(step.rows), step.q) if self.model.first else (len(step.rows), step.q, self.model.hidden)
        dtype = torch.long if self.model.first else self.model.dtype
        return torch.zeros(shape, dtype=dtype, device=self.model.device)

    def _compute(self, step: Step, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage's work on one step: (embedding,) layers (, head); the hidden states and the logits (last)."""
        model = self.model
        hidden = model.embed(inputs, step.pos) if model.first else inputs
        hidden = model.run_layers(hidden, self.cache.view(step.rows, step.pos))
        return hidden, model.head(hidden) if model.last else None

    def _hidden_recv(self, step: Step) -> Pending:
        assert self.ring is not None
        return self.ring.post_hidden((len(step.rows), step.q, self.model.hidden), self.model.dtype, step.index)

    def _post_ahead(self, steps: Sequence[Step]) -> deque[Pending]:
        """The receives of a phase's first min(K, 2) steps, posted before the phase starts; each received step
        posts the receive of the step that many places later."""
        if self.ring is None or self.model.first:
            return deque()
        ahead = min(len({s.rows.start for s in steps}), POSTED_MESSAGES)
        return deque(self._hidden_recv(s) for s in steps[:ahead])

    def _run_phase(self, phase: str, steps: Sequence[Step], prompts: torch.Tensor, inbox: deque[Pending]) -> None:
        ring, model = self.ring, self.model
        returning: dict[tuple[int, int], tuple[Step, Pending]] = {}
        ahead = len(inbox)
        for i, step in enumerate(steps):
            if self.fault is not None and step.round == self.fault.round:
                self.fault.strike()
            if not model.first:
                inputs = ring.wait(inbox.popleft(), phase)
            elif ring is not None and step.round > 1:
                self._collect(phase, *returning.pop((step.round - 1, step.rows.start)))
            with self.clock.compute(phase):
                if model.first:
                    rows = slice(step.rows.start, step.rows.stop)
                    inputs = prompts[rows] if phase == "prefill" else self.tokens[rows, step.round - 1:step.round]
                elif i + ahead < len(steps):
                    inbox.append(self._hidden_recv(steps[i + ahead]))
                if ring is not None and model.first:
                    returning[(step.round, step.rows.start)] = (step, ring.post_tokens(len(step.rows), step.index))
                hidden, logits = self._compute(step, inputs)
                out = logits.argmax(dim=-1) if logits is not None else None
                if logits is not None:
                    self._record(step, logits)
                if ring is None:
                    self.tokens[step.rows.start:step.rows.stop, step.round] = out
                elif model.last:
                    ring.send_tokens(out, step.index, phase)
                else:
                    ring.send_hidden(hidden, step.index, phase)
        for step, pending in returning.values():
            self._collect(phase, step, pending)
        if ring is not None:
            ring.drain(phase)

    def _collect(self, phase: str, step: Step, pending: Pending) -> None:
        """Store the token ids of `step` that came back from the last stage (first stage)."""
        assert self.ring is not None and self.tokens is not None
        self.tokens[step.rows.start:step.rows.stop, step.round] = self.ring.wait(pending, phase)

    def _record(self, step: Step, logits: torch.Tensor) -> None:
        rows = slice(step.rows.start, step.rows.stop)
        if self.first_logits is not None and step.round == 0:
            self.first_logits[rows] = logits.cpu()
        if self.last_logits is not None and step.round == self.gen_len - 1:
            self.last_logits[rows] = logits.cpu()
