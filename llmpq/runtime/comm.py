"""Point-to-point messages of one stage in the ring: hidden states to the next stage, token ids back to the first.

Two process groups carry the two directions (hidden states forward, token ids back), so every connection
carries one direction only: with gloo, messages crossing on one connection stall each other (measured on
two stages: a decode round of 2 × 0.4 ms took 2.0 ms with one group and 1.0 ms with two). Every message is
tagged with its step's index, so a receive can be posted early and still match the right message. Sends
are asynchronous; their buffers stay alive until they complete, and at most `POSTED_MESSAGES` (2) are in
flight per direction: a third waits for the oldest (the memory model counts exactly these buffers,
`llmpq.costmodel.memory.buffers_bytes`). The time a stage spends blocked on either end is its wait time.

Start-up (`Ring.connect`): NCCL creates the communicator of a pair of ranks in a group lazily, at their first
message, and both ranks block until the other joins. A stage that posts a receive on one group while its peer
posts on another would wait forever, so before the schedule every rank takes part in one small exchange per
ring edge, both directions, in one global order (`startup_exchanges`: the edges leaving stage 0, then those
leaving stage 1, ... , the return edge last). Every rank follows that order restricted to its own edges, so
the earliest unfinished exchange always has both of its ranks waiting on it: the start-up cannot deadlock.
Afterwards every communicator exists and receives may be posted ahead in any order.

Every wait (start-up included) passes the process group's timeout to `Work.wait`, which bounds it on NCCL as
on gloo (with a timeout NCCL blocks the host until the transfer is done, so the wait clock sees the transfer).
A peer that dies closes the connection; one that stops answering makes the wait time out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, Sequence

import torch

from ..costmodel.memory import POSTED_MESSAGES
from .measure import StageClock

CONNECT_TAG = 1 << 24   # start-up exchanges; step messages are tagged with step indices, far below
PRIME_TAG = CONNECT_TAG + 1   # the priming round's messages (`Ring.prime`): PRIME_TAG + i
CHAIN, RETURN = "chain", "return"   # a group's edges: j -> j + 1 for every stage but the last; last -> first


class Work(Protocol):
    def wait(self, timeout: timedelta = ...) -> Any: ...

    def is_completed(self) -> bool: ...


class P2P(Protocol):
    """What a ring needs of torch.distributed (a fake in the tests records and checks the order of calls)."""

    def new_group(self, ranks: list[int], timeout: timedelta) -> Any: ...

    def isend(self, tensor: torch.Tensor, dst: int, tag: int, group: Any) -> Work: ...

    def irecv(self, tensor: torch.Tensor, src: int, tag: int, group: Any) -> Work: ...

    def barrier(self, device: torch.device) -> None: ...


class TorchP2P:
    """`P2P` over torch.distributed (the default process group must be initialised)."""

    def new_group(self, ranks: list[int], timeout: timedelta) -> Any:
        import torch.distributed as dist

        return dist.new_group(ranks, timeout=timeout)

    def isend(self, tensor: torch.Tensor, dst: int, tag: int, group: Any) -> Work:
        import torch.distributed as dist

        return dist.isend(tensor, dst=dst, tag=tag, group=group)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int, group: Any) -> Work:
        import torch.distributed as dist

        return dist.irecv(tensor, src=src, tag=tag, group=group)

    def barrier(self, device: torch.device) -> None:
        import torch.distributed as dist

        if device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


@dataclass(frozen=True)
class Exchange:
    """One start-up exchange on `group`: `a` sends to `b`, then `b` sends to `a` (one element each way)."""

    group: str
    a: int
    b: int


def startup_exchanges(world: int, links: Sequence[tuple[str, str]]) -> list[Exchange]:
    """Every ring edge of every group, in pipeline order: the edges leaving stage 0 (in `links` order), then stage
    1's, ..., the last stage's return edges. `links`: (group, CHAIN | RETURN). Empty for one stage."""
    if world < 2:
        return []
    out = []
    for j in range(world):
        for group, kind in links:
            if kind == CHAIN and j < world - 1:
                out.append(Exchange(group, j, j + 1))
            elif kind == RETURN and j == world - 1:
                out.append(Exchange(group, j, 0))
    return out


@dataclass
class Pending:
    """A posted receive: its buffer fills once `work` completes."""

    work: Any
    buffer: torch.Tensor


class Ring:
    """One rank's links in the ring of `world` stages (rank j runs stage j; the process group is initialised).

    `timeout` bounds every wait on a peer (new groups do not inherit the default group's timeout). Call
    `connect()` before posting anything.
    """

    LINKS: tuple[tuple[str, str], ...] = (("forward", CHAIN), ("back", RETURN))

    def __init__(self, rank: int, world: int, clock: StageClock, device: torch.device, timeout: timedelta,
                 p2p: P2P | None = None):
        self.rank, self.world, self.clock, self.device, self.timeout = rank, world, clock, device, timeout
        self.p2p: P2P = p2p or TorchP2P()
        self.groups = {name: self.p2p.new_group(list(range(world)), timeout) for name, _ in self.LINKS}
        self.forward, self.back = self.groups["forward"], self.groups["back"]
        self._sends: deque[tuple[Any, torch.Tensor]] = deque()

    def connect(self, exchanges: Sequence[Exchange] | None = None) -> None:
        """This rank's start-up exchanges, in the global order (module docstring; `exchanges` replaces that order, for
        tests of what another order would do); each wait bounded by the timeout."""
        buffer = torch.zeros(1, dtype=torch.long, device=self.device)
        for ex in startup_exchanges(self.world, self.LINKS) if exchanges is None else exchanges:
            if self.rank not in (ex.a, ex.b):
                continue
            group, peer = self.groups[ex.group], ex.b if self.rank == ex.a else ex.a
            order = ("send", "recv") if self.rank == ex.a else ("recv", "send")
            for op in order:
                if op == "send":
                    work = self.p2p.isend(buffer, peer, CONNECT_TAG, group)
                else:
                    work = self.p2p.irecv(buffer, peer, CONNECT_TAG, group)
                work.wait(self.timeout)

    def prime(self, hidden: tuple[int, ...], dtype: torch.dtype, tokens: int) -> None:
        """One round of the schedule's messages, after `connect()` and before a stage notes its memory:
        `POSTED_MESSAGES` hidden states of shape `hidden` down the chain and as many messages of `tokens` token ids
        back, all in flight at once (receives posted first), then a barrier. Gloo allocates buffers for a pair's
        first messages in flight and for its first barrier once per process (`benchmarks/stage_memory.py`: 1.1-1.2
        MiB per rank after the first round, 0.17 MiB after the next), which the stage's measured memory would otherwise count as its own; this is
        to the messaging library what `measure.prime_math_libraries` is to the math libraries."""
        posted, sent = [], []
        for i in range(POSTED_MESSAGES):
            if self.rank > 0:
                posted.append(self._post(hidden, dtype, self.rank - 1, PRIME_TAG + i, self.forward))
            if self.rank == 0:
                posted.append(self._post((tokens,), torch.long, self.world - 1, PRIME_TAG + i, self.back))
        for i in range(POSTED_MESSAGES):
            if self.rank < self.world - 1:
                out = torch.zeros(hidden, dtype=dtype, device=self.device)
                sent.append((self.p2p.isend(out, self.rank + 1, PRIME_TAG + i, self.forward), out))
            else:
                out = torch.zeros(tokens, dtype=torch.long, device=self.device)
                sent.append((self.p2p.isend(out, 0, PRIME_TAG + i, self.back), out))
        for work in [p.work for p in posted] + [w for w, _ in sent]:
            work.wait(self.timeout)
        self.barrier()

    def _post(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: int, group: Any) -> Pending:
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        return Pending(self.p2p.irecv(buffer, src, tag, group), buffer)

    def _send(self, tensor: torch.Tensor, dst: int, tag: int, group: Any, phase: str) -> None:
        """Start a send; with `POSTED_MESSAGES` already in flight, first wait (wait time) for the oldest."""
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()[0].wait(self.timeout)
        if len(self._sends) >= POSTED_MESSAGES:
            with self.clock.wait(phase):
                while len(self._sends) >= POSTED_MESSAGES:
                    self._sends.popleft()[0].wait(self.timeout)
        tensor = tensor.contiguous()
        self._sends.append((self.p2p.isend(tensor, dst, tag, group), tensor))

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

    def wait(self, pending: Pending, phase: str | None) -> torch.Tensor:
        """The buffer of a posted receive once it has arrived; the time blocked counts as `phase`'s wait time
        (none for `phase=None`)."""
        with self.clock.wait(phase):
            pending.work.wait(self.timeout)
        return pending.buffer

    def drain(self, phase: str) -> None:
        with self.clock.wait(phase):
            while self._sends:
                self._sends.popleft()[0].wait(self.timeout)

    def barrier(self) -> None:
        self.p2p.barrier(self.device)
        self.clock.sync()
