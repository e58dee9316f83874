"""`llmpq profile-links cluster=NAME`: time stage-to-stage transfers of a present cluster, per link class.

Two local processes exchange tensors over torch.distributed, two ways per payload size (a few sizes):

- `idle`: a ping-pong, one-way time = round trip / 2 (median over the repeats);
- `busy`: both ranks compute between messages as pipeline stages do (post the receive, compute about
  `BUSY_MS`, send, wait for both), and the message cost under load is the round's median minus the median of
  the same rounds without messages. This is what a stage pays per message when every core (or GPU) runs a
  stage; the cost model uses it where present (`llmpq.costmodel.context.read_links`).

On a CPU cluster the processes use gloo over the loopback (two of the machine's cores). On a GPU cluster they
use NCCL between two GPUs of this node (`cuda:0`, `cuda:1`), and only where two are visible; otherwise
nothing is measured and the cluster's configured links stay in use (a CPU loopback figure is never filed for
a GPU link). The `links` table holds the points; the cost model fits α + bytes / bandwidth to them per link
class and load (`llmpq.costmodel.comm.fit_link`). Only `intra_node` can be measured from one node; a cluster
with several nodes keeps its configured `inter_node` link (measuring it needs one process per node).
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from llmpq import paths
from llmpq.artifacts import provenance, write_table
from llmpq.config import ClusterSpec, DeviceSpec
from llmpq.config.compose import config_hash
from llmpq.profile.load import load_average

PAYLOAD_BYTES = (4 << 10, 64 << 10, 1 << 20, 8 << 20)
BUSY_MS = 0.5   # compute per round of the busy exchange (about a small stage's step)


@dataclass(frozen=True)
class LinkPoint:
    """Median one-way time of a payload size over `repeats` rounds (ms), idle or under load."""

    payload_bytes: int
    latency_ms: float
    repeats: int
    load: str = "idle"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _busy_work(device: Any, target_ms: float):
    """A closure computing about `target_ms` on `device` (products of a small matrix, calibrated here)."""
    import torch

    size = 128 if device.type == "cpu" else 2048
    a = torch.randn(size, size, device=device) / size ** 0.5

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def calls(n: int) -> None:
        x = a
        for _ in range(n):
            x = torch.tanh(a @ x)
        sync()

    calls(3)
    start = time.perf_counter()
    calls(10)
    per_call = max((time.perf_counter() - start) * 1e3 / 10, 1e-3)
    n = max(1, round(target_ms / per_call))
    return lambda: calls(n)


def _exchange(rank: int, port: int, backend: str, payloads: Sequence[int], warmup: int, repeats: int,
              queue: Any) -> None:
    """One rank of both measurements; rank 0 puts the LinkPoints on `queue`."""
    import statistics

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, **kwargs)
    peer = 1 - rank

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        points = []
        busy = _busy_work(device, BUSY_MS)
        for nbytes in payloads:
            buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
            times = []
            for i in range(warmup + repeats):
                dist.barrier()
                sync()
                start = time.perf_counter_ns()
                if rank == 0:
                    dist.send(buf, peer)
                    dist.recv(buf, peer)
                else:
                    dist.recv(buf, peer)
                    dist.send(buf, peer)
                sync()
                if i >= warmup:
                    times.append((time.perf_counter_ns() - start) / 2e6)
            points.append(LinkPoint(nbytes, statistics.median(times), repeats, "idle"))
            out, back = torch.zeros_like(buf), torch.zeros_like(buf)
            rounds, alone = [], []
            dist.barrier()
            for i in range(warmup + repeats):
                start = time.perf_counter_ns()
                recv = dist.irecv(back, peer, tag=i)
                busy()
                send = dist.isend(out, peer, tag=i)
                recv.wait()
                send.wait()
                sync()
                middle = time.perf_counter_ns()
                busy()
                end = time.perf_counter_ns()
                if i >= warmup:
                    rounds.append((middle - start) / 1e6)
                    alone.append((end - middle) / 1e6)
            cost = max(0.0, statistics.median(rounds) - statistics.median(alone))
            points.append(LinkPoint(nbytes, cost, repeats, "busy"))
        if rank == 0:
            queue.put(points)
    finally:
        dist.destroy_process_group()


def measure_pair(backend: str = "gloo", payloads: Sequence[int] = PAYLOAD_BYTES, warmup: int = 3, repeats: int = 10,
                 timeout_s: float = 180.0) -> list[LinkPoint]:
    """Idle and busy one-way transfer times between two fresh local processes, per payload size (gloo over the
    loopback, or NCCL between cuda:0 and cuda:1)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_exchange, args=(r, port, backend, tuple(payloads), warmup, repeats, queue))
             for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        points = queue.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    if any(p.exitcode not in (0, None) for p in procs):
        raise RuntimeError(f"link measurement failed: exit codes {[p.exitcode for p in procs]}")
    return points


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def link_plan(cluster: ClusterSpec, devices: Mapping[str, DeviceSpec], gpus: int) -> tuple[str | None, str]:
    """(backend, why): gloo for a CPU cluster with a node of two devices, NCCL for a GPU cluster with such a node
    when two GPUs are visible here, else None and the reason the configured links stay."""
    if not any(sum(c for _, c in n.devices) >= 2 for n in cluster.nodes):
        return None, "no node holds two devices: intra_node keeps its configured value"
    kinds = {devices[stem].kind for n in cluster.nodes for stem, _ in n.devices}
    if kinds == {"cpu"}:
        return "gloo", "gloo over the loopback between two of this machine's cores"
    if gpus >= 2:
        return "nccl", f"NCCL between cuda:0 and cuda:1 of this node ({gpus} GPUs visible)"
    return None, (f"a GPU cluster, and {gpus} GPU(s) visible here: GPU-to-GPU transfers cannot be measured, so "
                  "intra_node keeps its configured value (a CPU loopback figure is never filed for a GPU link)")


def profile_links_to(out: Path, cluster: ClusterSpec, devices: Mapping[str, DeviceSpec],
                     payloads: Sequence[int] = PAYLOAD_BYTES, repeats: int = 10, gpus: int | None = None) -> Path:
    """Measure the cluster's intra-node link where `link_plan` allows and write the `links` table to `out` (empty,
    with the reason in its metadata, where nothing could be measured)."""
    backend, why = link_plan(cluster, devices, visible_gpus() if gpus is None else gpus)
    rows: list[dict[str, Any]] = []
    if backend is not None:
        for p in measure_pair(backend, payloads, repeats=repeats):
            rows.append({"cluster": cluster.name, "link": "intra_node", "payload_bytes": p.payload_bytes,
                         "latency_ms": p.latency_ms, "repeats": p.repeats, "load": p.load})
    settings = {"payload_bytes": list(payloads), "repeats": repeats, "backend": backend or "none", "why": why,
                "busy_ms": BUSY_MS}
    meta = provenance(config_hash({"cluster": cluster.name, **settings}), device=backend or "none", **settings,
                      **load_average())
    return write_table("links", rows, out, meta)


def cli_profile_links(exp, args) -> int:
    """`llmpq profile-links cluster=NAME [out=PATH]`: measure the links of a cluster that is present here."""
    cluster = exp.cluster
    if not cluster.present:
        print(f"llmpq profile-links: cluster {cluster.name} is not present here (present: false); "
              "its configured links are used", file=sys.stderr)
        return 2
    out = Path(args.out or paths.links_path(args.results, cluster.name))
    if len(cluster.nodes) > 1:
        print(f"llmpq profile-links: {cluster.name} has {len(cluster.nodes)} nodes; inter_node keeps its configured value",
              file=sys.stderr)
    backend, why = link_plan(cluster, exp.devices, visible_gpus())
    print(f"llmpq profile-links: {why}", file=sys.stderr)
    path = profile_links_to(out, cluster, exp.devices)
    print(f"wrote {path}")
    return 0
