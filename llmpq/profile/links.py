"""`llmpq profile-links cluster=NAME`: time stage-to-stage transfers of a present cluster, per link class.

Two local processes exchange float32 tensors over torch.distributed (gloo, TCP on the loopback) in a
ping-pong: one-way time = round trip / 2, median over the repeats, for a few payload sizes. The
`links` table holds these points; the cost model fits α + bytes / bandwidth to them
(`llmpq.costmodel.comm.fit_link`). Only `intra_node` can be measured from one machine; a cluster with
several nodes keeps its configured `inter_node` link (measuring it needs one process per node).
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llmpq import paths
from llmpq.artifacts import provenance, write_table
from llmpq.config import ClusterSpec
from llmpq.config.compose import config_hash

PAYLOAD_BYTES = (4 << 10, 64 << 10, 1 << 20, 8 << 20)


@dataclass(frozen=True)
class LinkPoint:
    """Median one-way time of a payload size over `repeats` ping-pongs (ms)."""

    payload_bytes: int
    latency_ms: float
    repeats: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pingpong(rank: int, port: int, payloads: Sequence[int], warmup: int, repeats: int, queue: Any) -> None:
    """One rank of the ping-pong; rank 0 puts the LinkPoints on `queue`."""
    import statistics

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        points = []
        for nbytes in payloads:
            buf = torch.zeros(nbytes // 4, dtype=torch.float32)
            times = []
            for i in range(warmup + repeats):
                dist.barrier()
                start = time.perf_counter_ns()
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                if i >= warmup:
                    times.append((time.perf_counter_ns() - start) / 2e6)
            points.append(LinkPoint(nbytes, statistics.median(times), repeats))
        if rank == 0:
            queue.put(points)
    finally:
        dist.destroy_process_group()


def measure_loopback(payloads: Sequence[int] = PAYLOAD_BYTES, warmup: int = 3, repeats: int = 10,
                     timeout_s: float = 120.0) -> list[LinkPoint]:
    """One-way transfer times between two fresh local processes (gloo), per payload size."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_pingpong, args=(r, port, tuple(payloads), warmup, repeats, queue)) for r in (0, 1)]
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
        raise RuntimeError(f"link ping-pong failed: exit codes {[p.exitcode for p in procs]}")
    return points


def measurable_links(cluster: ClusterSpec) -> list[str]:
    """The link classes one machine can measure: intra_node where some node holds two devices or more."""
    return ["intra_node"] if any(sum(c for _, c in n.devices) >= 2 for n in cluster.nodes) else []


def profile_links_to(out: Path, cluster: ClusterSpec, payloads: Sequence[int] = PAYLOAD_BYTES, repeats: int = 10) -> Path:
    """Measure the cluster's measurable link classes and write the `links` table to `out`."""
    rows: list[dict[str, Any]] = []
    for link in measurable_links(cluster):
        for p in measure_loopback(payloads, repeats=repeats):
            rows.append({"cluster": cluster.name, "link": link, "payload_bytes": p.payload_bytes,
                         "latency_ms": p.latency_ms, "repeats": p.repeats})
    settings = {"payload_bytes": list(payloads), "repeats": repeats, "backend": "gloo"}
    meta = provenance(config_hash({"cluster": cluster.name, **settings}), device="loopback", **settings)
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
    path = profile_links_to(out, cluster)
    print(f"wrote {path}")
    return 0
