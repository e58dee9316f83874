"""The ring's start-up order, checked against a fake process group that behaves like NCCL at start-up: the
communicator of a pair of ranks in a group is created at their first message, and each rank blocks there
until the other joins. The fake records every call; a rank that waits too long raises Deadlock."""

from __future__ import annotations

import threading
from collections import deque
from datetime import timedelta

import pytest
import torch

from llmpq.runtime.comm import CONNECT_TAG, Exchange, Ring, startup_exchanges
from llmpq.runtime.genloop import GenerateRing
from llmpq.runtime.measure import StageClock

TIMEOUT = timedelta(seconds=7)
PATIENCE_S = 1.0
CPU = torch.device("cpu")


class Deadlock(RuntimeError):
    pass


class FakeWorld:
    """State shared by the ranks (threads): joined pair communicators, messages in flight, every call in order."""

    def __init__(self, world: int):
        self.world = world
        self.cond = threading.Condition()
        self.joined: dict[tuple[str, int, int], set[int]] = {}
        self.created: dict[tuple[str, int, int], str] = {}   # communicator -> label of the call that created it
        self.mail: dict[tuple[str, int, int, int], deque[torch.Tensor]] = {}
        self.calls: list[tuple[int, str, str, str, int]] = []  # (rank, label, op, group, peer)
        self.waits: list[timedelta] = []
        self.barrier = threading.Barrier(world, timeout=PATIENCE_S)

    def blocked_until(self, ready, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(ready, timeout=PATIENCE_S):
                raise Deadlock(what)


class FakeWork:
    def __init__(self, world: FakeWorld, done):
        self.world, self.done, self.finished = world, done, False

    def is_completed(self) -> bool:
        with self.world.cond:
            self.finished = self.finished or self.done()
            return self.finished

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        self.world.waits.append(timeout)
        self.world.blocked_until(self.is_completed_locked, "wait")
        return True

    def is_completed_locked(self) -> bool:
        self.finished = self.finished or self.done()
        return self.finished


class FakeP2P:
    """One rank's view of the fake process group (the `P2P` protocol of `llmpq.runtime.comm`)."""

    def __init__(self, world: FakeWorld, rank: int):
        self.world, self.rank, self.groups, self.label = world, rank, 0, "connect"

    def new_group(self, ranks, timeout):
        self.groups += 1
        return f"g{self.groups}"

    def _join(self, group: str, peer: int) -> None:
        w = self.world
        key = (group, min(self.rank, peer), max(self.rank, peer))
        with w.cond:
            if key not in w.joined:
                w.created[key] = self.label
            w.joined.setdefault(key, set()).add(self.rank)
            w.cond.notify_all()
        w.blocked_until(lambda: len(w.joined[key]) == 2, f"rank {self.rank} creating {key}")

    def isend(self, tensor, dst, tag, group):
        self.world.calls.append((self.rank, self.label, "send", group, dst))
        self._join(group, dst)
        with self.world.cond:
            self.world.mail.setdefault((group, self.rank, dst, tag), deque()).append(tensor.clone())
            self.world.cond.notify_all()
        return FakeWork(self.world, lambda: True)

    def irecv(self, tensor, src, tag, group):
        self.world.calls.append((self.rank, self.label, "recv", group, src))
        self._join(group, src)
        box = self.world.mail.setdefault((group, src, self.rank, tag), deque())

        def arrived() -> bool:
            if not box:
                return False
            tensor.copy_(box.popleft())
            return True
        return FakeWork(self.world, arrived)

    def barrier(self, device):
        self.world.barrier.wait()


def run_ranks(world: int, body) -> list:
    """Run body(rank, p2p) on `world` threads; each rank's return value or the exception it raised."""
    fake = FakeWorld(world)
    out: list = [None] * world

    def target(rank: int) -> None:
        try:
            out[rank] = body(rank, FakeP2P(fake, rank))
        except Exception as exc:  # collected and checked by the test
            out[rank] = exc
            with fake.cond:
                fake.cond.notify_all()

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    run_ranks.last = fake
    return out


def schedule_start(ring: Ring) -> None:
    """What the schedule does first: non-first stages post their first receives ahead; the first stage posts its
    token receive on the return group before its first send forward (the order that deadlocks without connect)."""
    ring.p2p.label = "schedule"
    if ring.rank == 0:
        back = ring.post_tokens(1, 0)
        ring.send_hidden(torch.ones(1, 2), 0, "prefill")
        ring.wait(back, "prefill")
    else:
        got = ring.wait(ring.post_hidden((1, 2), torch.float32, 0), "prefill")
        if ring.rank == ring.world - 1:
            ring.send_tokens(torch.zeros(1, dtype=torch.long), 0, "prefill")
        else:
            ring.send_hidden(got, 0, "prefill")
    ring.drain("prefill")


def test_startup_exchanges_follow_the_pipeline():
    assert startup_exchanges(1, Ring.LINKS) == []
    assert startup_exchanges(3, Ring.LINKS) == [Exchange("forward", 0, 1), Exchange("forward", 1, 2),
                                                Exchange("back", 2, 0)]
    assert startup_exchanges(3, GenerateRing.LINKS) == [
        Exchange("forward", 0, 1), Exchange("payloads", 0, 1), Exchange("forward", 1, 2), Exchange("payloads", 1, 2),
        Exchange("back", 2, 0)]
    for world in range(2, 7):
        edges = {(e.group, e.a, e.b) for e in startup_exchanges(world, GenerateRing.LINKS)}
        ring = {("forward", j, j + 1) for j in range(world - 1)} | {("payloads", j, j + 1) for j in range(world - 1)}
        assert edges == ring | {("back", world - 1, 0)}


@pytest.mark.parametrize("cls", [Ring, GenerateRing])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_connect_creates_every_communicator_before_the_schedule(cls, world):
    def body(rank, p2p):
        ring = cls(rank, world, StageClock(CPU), CPU, TIMEOUT, p2p)
        ring.connect()
        schedule_start(ring)
        return "done"

    out = run_ranks(world, body)
    assert out == ["done"] * world, out
    fake = run_ranks.last
    links = len(cls.LINKS)
    assert len(fake.created) == (world - 1) * (links - 1) + 1
    assert set(fake.created.values()) == {"connect"}          # the schedule found every communicator made
    assert fake.waits and set(fake.waits) == {TIMEOUT}        # every wait bounded by the group timeout
    connect_calls = [c for c in fake.calls if c[1] == "connect"]
    assert {c[4] for c in connect_calls if c[0] == 0} <= {1, world - 1}
    assert all(c[2] in ("send", "recv") for c in connect_calls)


def test_posting_ahead_without_connect_deadlocks():
    """Why `connect` exists: the schedule's own first calls, on fresh communicators, wait for each other."""
    def body(rank, p2p):
        schedule_start(Ring(rank, 2, StageClock(CPU), CPU, TIMEOUT, p2p))
        return "done"

    out = run_ranks(2, body)
    assert all(isinstance(o, Deadlock) for o in out), out


def test_an_order_that_is_not_global_deadlocks():
    """Rank 0 doing the return edge before its forward edge (each rank's order is not one global order) is caught."""
    world = 3
    order = startup_exchanges(world, Ring.LINKS)

    def body(rank, p2p):
        ring = Ring(rank, world, StageClock(CPU), CPU, TIMEOUT, p2p)
        ring.connect(list(reversed(order)) if rank == 0 else order)
        return "done"

    out = run_ranks(world, body)
    assert any(isinstance(o, Deadlock) for o in out), out


def test_connect_exchanges_one_element_each_way_with_its_own_tag():
    def body(rank, p2p):
        ring = Ring(rank, 2, StageClock(CPU), CPU, TIMEOUT, p2p)
        ring.connect()
        return ring

    out = run_ranks(2, body)
    fake = run_ranks.last
    assert all(isinstance(r, Ring) for r in out)
    assert sorted(k[3] for k in fake.mail) == [CONNECT_TAG] * 4   # two groups, both directions
    assert [(c[0], c[2]) for c in fake.calls if c[0] == 0] == [(0, "send"), (0, "recv"), (0, "recv"), (0, "send")]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_prime_sends_a_round_of_the_schedules_messages_after_connect(world):
    """`Ring.prime` (the messaging library's one-time buffers before a stage notes its memory): after `connect`,
    every chain edge carries POSTED_MESSAGES hidden states and the return edge as many token-id messages, all
    received, and the schedule then starts on the same communicators."""
    from llmpq.costmodel.memory import POSTED_MESSAGES
    from llmpq.runtime.comm import PRIME_TAG

    def body(rank, p2p):
        ring = Ring(rank, world, StageClock(CPU), CPU, TIMEOUT, p2p)
        ring.connect()
        p2p.label = "prime"
        ring.prime((2, 3, 4), torch.float32, 5)
        schedule_start(ring)
        return "done"

    out = run_ranks(world, body)
    assert out == ["done"] * world, out
    sends = [c for c in run_ranks.last.calls if c[1] == "prime" and c[2] == "send"]
    expected = {(j, "g1", j + 1) for j in range(world - 1)} | {(world - 1, "g2", 0)}   # forward, back
    assert sorted(sends) == sorted((r, "prime", "send", g, p) for r, g, p in expected for _ in range(POSTED_MESSAGES))
    assert set(run_ranks.last.created.values()) == {"connect"}
    assert not any(box for (_, _, _, tag), box in run_ranks.last.mail.items() if tag >= PRIME_TAG)  # all received
