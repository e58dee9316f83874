"""Messages for plans that cannot exist: memory (no arrangement fits) and quality (no plan meets Ω)."""

from __future__ import annotations

from llmpq.config.types import GIB
from llmpq.costmodel import memory as mem

from .tables import CostCache


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
    """'model needs X GiB at the lowest bits, cluster has Y GiB' (+ why, when the totals alone would fit)."""
    need, room, low = memory_need_and_room(cache)
    ctx = cache.ctx
    text = (f"model {ctx.shape.family} with {ctx.shape.num_layers} layers needs {need / GIB:.3g} GiB at the lowest "
            f"bits ({low}-bit weights + KV cache for {ctx.workload.batch} sequences of "
            f"{ctx.workload.kv_len} tokens + embedding/head), "
            f"cluster {ctx.cluster.name} has {room / GIB:.3g} GiB")
    if need <= room:
        text += (" in total, but no arrangement fits: stages hold whole layers, and the first and last stages "
                 "also hold the embedding and the LM head")
    return text


def least_omega(cache: CostCache, omega, settings) -> tuple[float, str] | None:
    """The smallest Σω of any plan that fits memory, and which plan has it; None if none fits.

    Candidates: the adabits plan, and the least-Σω plan of every device order at b_p = b_d = 1 (the
    micro-batches that need the least memory: activations, buffers and the KV cache's rounding all grow
    with them).
    """
    from .baselines import adabits
    from .errors import MemoryInfeasible
    from .milp import MilpOptions, solve_branch
    from .orders import device_orders
    from .tables import build_tables

    found: list[tuple[float, str]] = []
    try:
        plan = adabits(cache, omega, settings).candidate
        found.append((omega.total(plan.bits), "the adabits plan"))
    except MemoryInfeasible:
        pass
    options = MilpOptions(backend=settings.backend, time_limit_s=settings.time_limit_s, node_limit=settings.node_limit,
                          rel_gap=1e-9)
    for slots in device_orders(cache.ctx.cluster, omega.num_layers):
        tb = build_tables(cache, slots, 1, 1, omega, decode_points=settings.decode_points)
        result = solve_branch(tb, options, objective="omega")
        if result.assignment is not None:
            order = " → ".join(f"{stem}@{node}" for node, stem in slots)
            found.append((float(result.objective), f"micro-batches 1/1 on {order}"))
    return min(found, key=lambda x: x[0]) if found else None


def budget_message(budget: float, source: str, least: float, where: str) -> str:
    """The quality-budget error: the budget, and the smallest Σω that fits memory (and which plan has it)."""
    return (f"no plan meets the quality budget Σω ≤ {budget:.6g} ({source}); the smallest Σω that fits memory "
            f"is {least:.6g} ({where}): raise the budget or add memory")
