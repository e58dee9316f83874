"""One stage's part of a batch job: the first stage schedules and feeds the ring, the others relay steps.

The first stage asks the `Batcher` for every step that may start, computes its own part of each
(embedding and its layers; the head too in a one-stage pipeline), sends the step's header and hidden
states to the next stage and posts the receive of its token ids; then it waits for the oldest step in
flight (the ring is FIFO, so tokens come back in issue order), hands the tokens to the batcher and the
sequences that ended to `on_finished`. Every other stage keeps `window` step receives posted ahead,
learns each step from its header, runs its layers over its KV cache (`RaggedView`, per-row positions
and masks) and passes the result on; the last computes the greedy token of each row and sends the ids
back to the first. When the batcher is done, the first stage sends a stop message for every receive
its neighbour has posted; each stage forwards them and exits.

Step messages, the prefill payloads that follow them and token ids travel on three process groups, so
that each stream stays in order by itself: NCCL matches point-to-point messages in posting order and
ignores tags, and the step receives are posted ahead of any payload.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from .batcher import Batcher, Finished
from .comm import CHAIN, Pending, Ring
from .kvcache import StageKVCache
from .measure import StageClock
from .parts import StageModel
from .rows import RaggedView, RowLayout, row_tensors
from .wire import KINDS, PHASE_OF, STOP, Wire


class GenerateRing(Ring):
    """The ring of a batch job: the deploy ring's two groups (steps forward, token ids back) and a third for
    the prefill payloads that follow their step messages (created and connected like the others)."""

    LINKS = (*Ring.LINKS, ("payloads", CHAIN))

    def post_payload(self, nbytes: int, tag: int) -> Pending:
        """Receive a step's prefill hidden states (bytes) from the previous stage."""
        return self._post((nbytes,), torch.uint8, self.rank - 1, tag, self.groups["payloads"])

    def send_payload(self, payload: torch.Tensor, tag: int, phase: str) -> None:
        self._send(payload, self.rank + 1, tag, self.groups["payloads"], phase)


def window_size(batch: int, b_p: int, b_d: int) -> int:
    """Steps that can be in flight at once: one decode per group, prefills over every slot, one spare."""
    return -(-batch // b_d) + -(-batch // b_p) + 1


class GenerateLoop:
    """One stage of a batch job: its model part, KV cache, clock, message geometry and ring links."""

    def __init__(self, model: StageModel, cache: StageKVCache, clock: StageClock, wire: Wire,
                 ring: GenerateRing | None, window: int):
        if ring is None and not (model.first and model.last):
            raise ValueError("a stage without ring links must hold the whole model")
        self.model, self.cache, self.clock, self.wire, self.ring, self.window = model, cache, clock, wire, ring, window
        self.steps = 0

    def compute(self, phase: str, layout: RowLayout, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This stage's work on one step: (embedding,) layers (, head and greedy ids); hidden states and ids."""
        model = self.model
        with self.clock.compute(phase):
            rows = row_tensors(layout, model.device)
            hidden = model.embed(inputs, 0, rows.positions) if model.first else inputs
            hidden = model.run_layers(hidden, RaggedView(self.cache, layout), rows)
            ids = model.head(hidden).argmax(dim=-1) if model.last else None
        self.steps += 1
        return hidden, ids

    def _wait(self, pending: Pending, phase: str | None = None) -> tuple[torch.Tensor, float]:
        """The received buffer and the time blocked (ms; counted as `phase`'s wait time unless None)."""
        assert self.ring is not None
        with self.clock.wait(phase) as lap:
            pending.work.wait(self.ring.timeout)
        return pending.buffer, lap.ms

    def _send_step(self, kind: int, index: int, layout: RowLayout | None, hidden: torch.Tensor | None) -> None:
        assert self.ring is not None
        phase = PHASE_OF.get(kind, "decode")  # a stop message's (rare) hold-up counts as decode wait
        message, payload = self.wire.encode(kind, index, layout, hidden, self.model.device)
        self.ring.send_hidden(message, index, phase)
        if payload is not None:
            self.ring.send_payload(payload, index, phase)

    def _send_stops(self, first_index: int) -> None:
        for index in range(first_index, first_index + self.window):
            self._send_step(STOP, index, None, None)

    def run_first(self, batcher: Batcher, on_finished: Callable[[list[Finished]], None]) -> None:
        """Schedule and run the whole job from the first stage (module docstring)."""
        ring, device = self.ring, self.model.device
        in_flight: deque[tuple[int, str, torch.Tensor | Pending]] = deque()
        while not batcher.done:
            for step in batcher.issue():
                inputs = torch.tensor(step.inputs, dtype=torch.long, device=device)
                hidden, ids = self.compute(step.phase, step.layout, inputs)
                if ring is None:
                    assert ids is not None
                    in_flight.append((step.index, step.phase, ids))
                    continue
                back = ring.post_tokens(step.layout.rows, step.index)
                self._send_step(KINDS[step.phase], step.index, step.layout, hidden)
                in_flight.append((step.index, step.phase, back))
            if not in_flight:
                raise RuntimeError("the scheduler has nothing in flight and nothing to start")
            index, phase, got = in_flight.popleft()
            ids = got if isinstance(got, torch.Tensor) else self._wait(got, phase)[0]
            on_finished(batcher.complete(index, ids.tolist()))
        if ring is not None:
            self._send_stops(batcher.steps)
            ring.drain("decode")

    def run_relay(self) -> None:
        """Relay steps until the stop message (every stage but the first)."""
        ring, wire, model = self.ring, self.wire, self.model
        assert ring is not None and not model.first
        posted = deque((i, ring.post_hidden((wire.capacity,), torch.uint8, i)) for i in range(self.window))
        next_post = self.window
        while True:
            index, pending = posted.popleft()
            message, waited = self._wait(pending)
            header = wire.decode(message)
            if header.index != index:
                raise RuntimeError(f"expected step {index}, received step {header.index}")
            if header.kind == STOP:
                if not model.last:
                    self._send_stops(index)
                for _, rest in posted:
                    self._wait(rest)
                break
            phase = header.phase
            self.clock.add_wait(phase, waited)
            if header.inline:
                hidden = wire.inline_hidden(message, header)
            else:
                payload = ring.post_payload(wire.payload_bytes(header), index)
                hidden = wire.payload_hidden(self._wait(payload, phase)[0], header)
            posted.append((next_post, ring.post_hidden((wire.capacity,), torch.uint8, next_post)))
            next_post += 1
            assert header.layout is not None
            out, ids = self.compute(phase, header.layout, hidden)
            if model.last:
                assert ids is not None
                ring.send_tokens(ids, index, phase)
            else:
                self._send_step(header.kind, index, header.layout, out)
        ring.drain("decode")
