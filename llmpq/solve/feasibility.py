"""Plans that cannot exist: memory (no arrangement fits) and quality (no plan meets Ω): messages and reports.

The memory report (what an infeasible plan artifact records) gives per device, in the cluster's file order as a
pipeline, its capacity, what it needs before any layer (reserve, activations and buffers at its micro-batch, the
embedding on the first and the head on the last), one layer at the lowest bits with its KV
cache, how many whole layers fit, and the layers it would have to hold: its share of the model in proportion to
its free memory (a baseline's own split, for `uniform`), so that needed_bytes = fixed_bytes + layers_needed ·
layer_bytes stands against capacity_bytes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from llmpq.costmodel import memory as mem
from llmpq.units import format_bytes

from .errors import MemoryInfeasible
from .limits import Deadline, SearchSettings
from .omega_min import least_omega_plan
from .orders import device_orders, full_orders
from .quality import OmegaTable
from .tables import CostCache, omega_of

MEMORY_ADVICE = ("add devices or memory, allow lower bit-widths (model bits), or shrink the workload "
                 "(batch, prompt or generation length)")


def memory_need_and_room(cache: CostCache) -> tuple[int, int, int]:
    """(bytes the model needs at its lowest bits, bytes the cluster offers for it, the lowest bits).

    Need: L layers at the lowest bits any device supports + their KV cache for B sequences at s + n
    (on the device where that is smallest) + the embedding + the LM head matrix (if not tied).
    Room: Σ_devices capacity − the device's layer-independent needs at micro-batch 1 on a middle stage
    (reserve, activations, buffers).
    """
    ctx = cache.ctx
    shape = ctx.shape
    slots = ctx.cluster.device_slots()
    stems = sorted({stem for _, stem in slots})
    low = min(min(ctx.latency.menu(s)) for s in stems)
    per_layer = min(cache.layer_bytes(s, min(ctx.latency.menu(s)), 1) for s in stems)
    dev = ctx.devices[stems[0]]
    head = 0 if shape.tied_head else shape.head_params * mem.dtype_bytes(dev)
    need = shape.num_layers * per_layer + mem.embed_bytes(shape, dev) + head
    room = 0
    for _, stem in slots:
        fm = cache.fixed_memory(stem, 1, 1, first=False, last=False)
        room += max(0, fm.capacity_bytes - fm.total_bytes)
    return need, room, low


def memory_message(cache: CostCache) -> str:
    """'model M needs X at the lowest bits, cluster C has Y' (+ why, when the totals alone would fit) + what to change."""
    need, room, low = memory_need_and_room(cache)
    ctx = cache.ctx
    capacity = sum(cache.fixed_memory(stem, 1, 1, first=False, last=False).capacity_bytes
                   for _, stem in ctx.cluster.device_slots())
    text = (f"model {ctx.model or ctx.shape.family} with {ctx.shape.num_layers} layers needs {format_bytes(need)} at "
            f"the lowest bits ({low}-bit weights + KV cache for {ctx.workload.batch} sequences of "
            f"{ctx.workload.kv_len} tokens + embedding/head), cluster {ctx.cluster.name} has {format_bytes(room)} "
            f"for it ({format_bytes(capacity)} less each device's reserve, activations and buffers)")
    if need <= room:
        text += (" in total, but no arrangement fits: stages hold whole layers, and the first and last stages "
                 "also hold the embedding and the LM head")
    return f"{text}; {MEMORY_ADVICE}"


def memory_infeasible(cache: CostCache, prefix: str = "") -> MemoryInfeasible:
    """The error of a model that does not fit the cluster: `memory_message` (after `prefix`) and `memory_report`."""
    return MemoryInfeasible(prefix + memory_message(cache), memory_report(cache))


def memory_report(cache: CostCache, layers_needed: Sequence[int] | None = None, bits: int | None = None,
                  micro_batch: int = 1) -> dict[str, Any]:
    """Needed vs available memory per device (module docstring), in file order; `layers_needed`, `bits` and
    `micro_batch` (b_p = b_d) where a method fixes them (else the share of free memory, at each device's lowest
    bits, at micro-batch 1)."""
    need, room, low = memory_need_and_room(cache)
    ctx = cache.ctx
    slots = ctx.cluster.device_slots()
    rows = []
    for j, (node, stem) in enumerate(slots):
        fm = cache.fixed_memory(stem, micro_batch, micro_batch, first=j == 0, last=j == len(slots) - 1)
        b = bits if bits is not None else min(ctx.latency.menu(stem))
        layer = cache.layer_bytes(stem, b, micro_batch)
        free = max(0, fm.capacity_bytes - fm.total_bytes)
        rows.append({"device": stem, "node": node, "bits": b, "micro_batch": micro_batch,
                     "capacity_bytes": int(fm.capacity_bytes),
                     "fixed_bytes": int(fm.total_bytes), "layer_bytes": int(layer), "layers_fit": int(free // layer)})
    if layers_needed is None:
        free = np.asarray([r["capacity_bytes"] - r["fixed_bytes"] for r in rows], dtype=float).clip(min=0)
        share = free / free.sum() if free.sum() > 0 else np.full(len(rows), 1.0 / len(rows))
        layers_needed = [int(math.ceil(ctx.shape.num_layers * s)) for s in share]
    for row, n in zip(rows, layers_needed):
        row["layers_needed"] = int(n)
        row["needed_bytes"] = row["fixed_bytes"] + int(n) * row["layer_bytes"]
    return {"need_bytes": int(need), "room_bytes": int(room), "lowest_bits": int(low), "devices": rows}


def over_text(report: dict[str, Any]) -> str:
    """'p100-12g@n0 needs 12.3 GiB of 11.9 GiB, ...' for the devices of a memory report that do not fit."""
    over = [d for d in report["devices"] if d["needed_bytes"] > d["capacity_bytes"]]
    return ", ".join(f"{d['device']}@{d['node']} needs {format_bytes(d['needed_bytes'])} of "
                     f"{format_bytes(d['capacity_bytes'])} ({d['layers_needed']} layers, {d['layers_fit']} fit)"
                     for d in over)


def least_omega(cache: CostCache, omega: OmegaTable, settings: SearchSettings,
                deadline: Deadline) -> tuple[float, str, bool] | None:
    """The smallest Σω found of a plan that fits memory, which plan has it, and whether it is proven the least
    (every MILP solved to optimality before the deadline); None if none was found.

    Candidates: the least-Σω plan over orders of every device at b_p = b_d = ⌈B/N⌉ (adabits' first step), and
    over every device order at b_p = b_d = 1 (the micro-batches that need the least memory: activations,
    buffers and the KV cache's rounding all grow with them).
    """
    cluster = cache.ctx.cluster
    b = -(-cache.ctx.workload.batch // len(cluster.device_slots()))
    found: list[tuple[float, str]] = []
    complete = True
    for orders, size, where in ((full_orders(cluster), b, "the adabits plan"),
                                (device_orders(cluster, omega.num_layers), 1, "micro-batches 1/1 on {order}")):
        got = least_omega_plan(cache, omega, orders, size, size, settings, deadline)
        complete = complete and not deadline.expired() and (got is None or got.status == "optimal")
        if got is not None:
            order = " → ".join(f"{stem}@{node}" for node, stem in got.tables.slots)
            found.append((omega_of(got.tables, got.assignment), where.format(order=order)))
    if not found:
        return None
    value, where = min(found, key=lambda x: x[0])
    return value, where, complete


def budget_message(budget: float, source: str, least: tuple[float, str, bool] | None) -> str:
    """The quality-budget error: the budget, the smallest Σω that fits memory (and which plan has it), what to change."""
    head = f"no plan meets the quality budget Σω ≤ {budget:.6g} ({source})"
    if least is None:
        return f"{head}; no plan that fits memory was found within solver.time_limit_s: raise the budget or the time limit"
    value, where, complete = least
    found = "the smallest Σω that fits memory" if complete else "the smallest Σω found (not proven least) that fits memory"
    return f"{head}; {found} is {value:.6g} ({where}): raise the budget or add memory"
