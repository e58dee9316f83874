"""Communication between stages: α + bytes / bandwidth per link, and the payloads that cross them.

Links are the cluster's two classes (`intra_node`, `inter_node`); measured ones (from `profile-links`)
replace the configured ones where present: the idle transfer time is the link's own time c_j, and the cost per
message measured with both ranks computing (`busy`) is what the sending stage pays in its own time per step
(`message_ms`; 0 where not measured).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from llmpq.config import ClusterSpec, DeviceSpec, Link
from llmpq.models.shape import ModelShape

from .memory import TOKEN_ID_BYTES, dtype_bytes

LINK_CLASSES = ("intra_node", "inter_node")


def transfer_ms(link: Link, nbytes: int) -> float:
    """c = α + bytes / BW (ms), with α = latency_us / 1e3 and BW in GB/s = 1e9 B/s."""
    return link.latency_us / 1e3 + nbytes / (link.bandwidth_gbps * 1e9) * 1e3


def hidden_bytes(shape: ModelShape, batch: int, tokens: int, device: DeviceSpec) -> int:
    """Activation payload = b · tokens · hidden · d (bytes), d of the sender's activation dtype."""
    return batch * tokens * shape.hidden * dtype_bytes(device)


def token_bytes(batch: int) -> int:
    """Return-link payload: one int64 token id per sequence = b · 8 (bytes)."""
    return batch * TOKEN_ID_BYTES


def sent_bytes(shape: ModelShape, device: DeviceSpec, batch: int, tokens: int, *, returns: bool) -> int:
    """What a stage sends per step: hidden states (`hidden_bytes`), or token ids on the return link (`token_bytes`)."""
    return token_bytes(batch) if returns else hidden_bytes(shape, batch, tokens, device)


def link_class(cluster: ClusterSpec, node_a: str, node_b: str) -> str:
    """The link class joining two nodes of `cluster`: intra_node on one node, else inter_node."""
    names = {n.name for n in cluster.nodes}
    for node in (node_a, node_b):
        if node not in names:
            raise ValueError(f"cluster {cluster.name}: unknown node {node!r} (known: {', '.join(sorted(names))})")
    return "intra_node" if node_a == node_b else "inter_node"


def link_between(cluster: ClusterSpec, node_a: str, node_b: str, measured: Mapping[str, Link] | None = None) -> Link:
    """The link class joining two nodes (same node: intra_node), measured if available, else configured."""
    kind = link_class(cluster, node_a, node_b)
    if measured and kind in measured:
        return measured[kind]
    return cluster.intra_node if kind == "intra_node" else cluster.inter_node


def fit_link(payload_bytes: Sequence[float], latency_ms: Sequence[float]) -> Link:
    """Fit of t = α + bytes / BW to measured transfers, least squares on the relative error (each point weighted
    by 1 / its time, so that the small payloads of decode steps are fitted as well as the megabytes of a prefill;
    a plain fit let an 8 MiB point decide α, and clamped it to 0); α and 1/BW clamped at >= 0.

    Returns latency_us = α·1e3 and bandwidth_gbps = 1e-6 / slope (slope in ms per byte).
    """
    import numpy as np

    x = np.asarray(payload_bytes, dtype=float)
    y = np.asarray(latency_ms, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("fitting a link needs at least two different payload sizes")
    w = 1.0 / np.maximum(y, 1e-9)
    slope, alpha = np.polyfit(x, y, 1, w=w)
    if alpha < 0:
        slope, alpha = float(np.dot(w * w * x, y) / np.dot(w * w * x, x)), 0.0
    slope = max(float(slope), 1e-15)
    return Link(bandwidth_gbps=1e-6 / slope, latency_us=float(alpha) * 1e3)


def message_ms(cluster: ClusterSpec, node_a: str, node_b: str, per_message: Mapping[str, Link], nbytes: int) -> float:
    """What a stage on `node_a` pays in its own time to send `nbytes` to `node_b` while every stage computes: the
    link class's measured per-message cost under load (`profile-links` busy rows), 0 where it was not measured."""
    kind = link_class(cluster, node_a, node_b)
    return transfer_ms(per_message[kind], nbytes) if kind in per_message else 0.0
