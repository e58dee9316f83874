"""Device orders the search visits: distinct pipeline sequences of device subsets.

Devices of one stem on one node are interchangeable (same speed, memory and links), so an order is a
sequence of (node, stem) labels, and each distinct sequence is visited once: this is the symmetry
breaking between identical devices. Every non-empty sub-multiset, in every distinct arrangement, is a
candidate (a cluster may be faster without its slowest devices). When that number exceeds `limit`,
only node-contiguous arrangements are kept (each node's devices adjacent: fewest inter-node hops).
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import permutations, product
from typing import Iterator

from llmpq.config import ClusterSpec

from .tables import Slot

ORDER_LIMIT = 120


def labels(cluster: ClusterSpec) -> list[tuple[Slot, int]]:
    """Distinct (node, stem) labels in file order with their counts."""
    counts = Counter(cluster.device_slots())
    return [(slot, counts[slot]) for slot in dict.fromkeys(cluster.device_slots())]


def _count_sequences(counts: list[int], max_len: int) -> int:
    total = 0
    for pick in product(*(range(c + 1) for c in counts)):
        n = sum(pick)
        if 1 <= n <= max_len:
            total += math.factorial(n) // math.prod(math.factorial(k) for k in pick)
    return total


def _sequences(items: list[Slot], left: list[int], length: int) -> Iterator[tuple[Slot, ...]]:
    """Distinct sequences of exactly `length` labels drawn from the multiset (label order = list order)."""
    if length == 0:
        yield ()
        return
    for i, slot in enumerate(items):
        if left[i]:
            left[i] -= 1
            for rest in _sequences(items, left, length - 1):
                yield (slot,) + rest
            left[i] += 1


def all_orders(cluster: ClusterSpec, max_stages: int) -> list[tuple[Slot, ...]]:
    """Every distinct sequence of 1..min(devices, max_stages) labels, deterministic order."""
    found = labels(cluster)
    items, counts = [s for s, _ in found], [c for _, c in found]
    top = min(sum(counts), max_stages)
    return [seq for n in range(1, top + 1) for seq in _sequences(items, list(counts), n)]


def node_block_orders(cluster: ClusterSpec, max_stages: int) -> list[tuple[Slot, ...]]:
    """Sequences where each node's devices are adjacent (nodes in any order, any subset)."""
    found = labels(cluster)
    by_node: dict[str, list[tuple[Slot, int]]] = {}
    for slot, count in found:
        by_node.setdefault(slot[0], []).append((slot, count))
    per_node = {}
    for node, group in by_node.items():
        items, counts = [s for s, _ in group], [c for _, c in group]
        per_node[node] = [()] + [seq for n in range(1, sum(counts) + 1) for seq in _sequences(items, list(counts), n)]
    out: list[tuple[Slot, ...]] = []
    seen: set[tuple[Slot, ...]] = set()
    for node_order in permutations(by_node):
        for parts in product(*(per_node[n] for n in node_order)):
            seq = tuple(s for part in parts for s in part)
            if 1 <= len(seq) <= max_stages and seq not in seen:
                seen.add(seq)
                out.append(seq)
    rank = {slot: i for i, (slot, _) in enumerate(found)}
    return sorted(out, key=lambda s: (len(s), [rank[x] for x in s]))


def device_orders(cluster: ClusterSpec, max_stages: int, limit: int = ORDER_LIMIT) -> list[tuple[Slot, ...]]:
    """The orders the search visits (module docstring)."""
    counts = [c for _, c in labels(cluster)]
    if _count_sequences(counts, max_stages) <= limit:
        return all_orders(cluster, max_stages)
    return node_block_orders(cluster, max_stages)


def full_orders(cluster: ClusterSpec, limit: int = ORDER_LIMIT) -> list[tuple[Slot, ...]]:
    """Distinct orders that use every device (the baselines' search space), file order first."""
    n = len(cluster.device_slots())
    found = labels(cluster)
    items, counts = [s for s, _ in found], [c for _, c in found]
    if math.factorial(n) // math.prod(math.factorial(c) for c in counts) <= limit:
        return list(_sequences(items, list(counts), n))
    return [o for o in node_block_orders(cluster, n) if len(o) == n]
