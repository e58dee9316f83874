"""Point-to-point messages of one stage in the ring: hidden states to the next stage, token ids back to the first.

Two process groups carry the two directions (hidden states forward, token ids back), so every connection
carries one direction only: with gloo, messages crossing on one connection stall each other (measured on
two stages: a decode round of 2 × 0.4 ms took 2.0 ms with one group and 1.0 ms with two). Every message is
tagged with its step's index, so a receive can be posted early and still match the right message. Sends
are asynchronous; their buffers stay alive until they complete, and at most `POSTED_MESSAGES` (2) are in
flight per direction: a third waits for the oldest (the memory model counts exactly these buffers,
`llmpq.costmodel.memory.buffers_bytes`). The time a stage spends blocked on either end is its wait time. Failures surface as exceptions: a peer that dies closes the connection, one
that stops answering makes the wait time out after the process group's timeout.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..costmodel.memory import POSTED_MESSAGES
from .measure import StageClock


@dataclass
class Pending:
    """A posted receive: its buffer fills once `work` completes."""

    work: Any
    buffer: torch.Tensor


class Ring:
    """One rank's links in the ring of `world` stages (rank j runs stage j; the process group is initialised).

    `timeout` bounds every wait on a peer (new groups do not inherit the default group's timeout).
    """

    def __init__(self, rank: int, world: int, clock: StageClock, device: torch.device, timeout: timedelta):
        self.rank, self.world, self.clock, self.device = rank, world, clock, device
        self.forward = dist.new_group(list(range(world)), timeout=timeout)
        self.back = dist.new_group(list(range(world)), timeout=timeout)
        self._sends: deque[tuple[Any, torch.Tensor]] = deque()

    def _post(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int, group: Any) -> Pending:
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        return Pending(dist.irecv(buffer, src=src, tag=tag, group=group), buffer)

    def _send(self, tensor: torch.Tensor, dst: int, tag: int, group: Any, phase: str) -> None:
        """Start a send; with `POSTED_MESSAGES` already in flight, first wait (wait time) for the oldest."""
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()[0].wait()
        if len(self._sends) >= POSTED_MESSAGES:
            with self.clock.wait(phase):
                while len(self._sends) >= POSTED_MESSAGES:
                    self._sends.popleft()[0].wait()
        tensor = tensor.contiguous()
        self._sends.append((dist.isend(tensor, dst=dst, tag=tag, group=group), tensor))

    def post_hidden(self, shape: tuple[int, ...], dtype: torch.dtype, tag: int) -> Pending:
        """Receive hidden states from the previous stage."""
        return self._post(shape, dtype, self.rank - 1, tag, self.forward)

    def send_hidden(self, hidden: torch.Tensor, tag: int, phase: str) -> None:
        """Send hidden states to the next stage."""
        self._send(hidden, self.rank + 1, tag, self.forward, phase)

    def post_tokens(self, count: int, tag: int) -> Pending:
        """Receive `count` token ids from the last stage (first stage)."""
        return self._post((count,), torch.long, self.world - 1, tag, self.back)

    def send_tokens(self, ids: torch.Tensor, tag: int, phase: str) -> None:
        """Send token ids to the first stage (last stage)."""
        self._send(ids, 0, tag, self.back, phase)

    def wait(self, pending: Pending, phase: str) -> torch.Tensor:
        with self.clock.wait(phase):
            pending.work.wait()
        return pending.buffer

    def drain(self, phase: str) -> None:
        with self.clock.wait(phase):
            while self._sends:
                self._sends.popleft()[0].wait()

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()
