"""The exact score of a plan: stage times, link times and memory, composed by the ring-pipeline formulas.

Prefill: K_p = ceil(B/b_p) micro-batches of b_p prompts of s tokens; every link but the return carries
b_p·s·hidden activations, the return link b_p token ids. Decode: n − 1 rounds of K_d = ceil(B/b_d)
micro-batches of one token each; round k attends over context s + k; links carry b_d·hidden, the
return link b_d token ids. Every round is scored (no mid-generation shortcut); `llmpq.costmodel.pipeline`
composes them. A partial last micro-batch is costed as a full one.

Each stage runs each of its bit-widths on one weight kernel (`StageAssignment.kernels`); where a plan does
not say which, `choose_kernel` picks it: of the device's menu for those bits, the kernel with the least
busy time of one layer over the whole job (ties: the kernel table's order).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from .comm import link_between, message_ms, sent_bytes, transfer_ms
from .context import CostContext
from .memory import StageMemory, stage_memory
from .pipeline import PhaseTimes, micro_batches, pipeline_time, throughput_tok_s


@dataclass(frozen=True)
class StageAssignment:
    """One pipeline stage: a device (stem) on a node holding layers [start, end) at `bits` each, each bit-width
    on the weight kernel `kernels` names ((bits, kernel) pairs, highest bits first; empty: not chosen yet)."""

    device: str
    node: str
    start: int
    end: int
    bits: tuple[int, ...]
    kernels: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        kernels = dict(self.kernels.items() if isinstance(self.kernels, Mapping) else self.kernels)
        object.__setattr__(self, "kernels", tuple(sorted(((int(b), str(k)) for b, k in kernels.items()), reverse=True)))
        if not 0 <= self.start < self.end:
            raise ValueError(f"stage on {self.device}: needs 0 <= start < end, got [{self.start}, {self.end})")
        if len(self.bits) != self.end - self.start:
            raise ValueError(f"stage on {self.device}: {len(self.bits)} bit-widths for layers [{self.start}, {self.end})")
        if self.kernels and {b for b, _ in self.kernels} != set(self.bits):
            raise ValueError(f"stage on {self.device}: kernels for bits {sorted(kernels)}, layers have {sorted(set(self.bits))}")

    @property
    def kernel_map(self) -> dict[int, str]:
        """bits -> kernel."""
        return dict(self.kernels)


@dataclass(frozen=True)
class Estimate:
    """Predicted time and memory of a plan. Stage and link times are per micro-batch (ms), decode ones at
    mid-generation context s + max(1, n // 2); `bottleneck_stage` is the busiest stage over the whole job."""

    prefill_s: float
    decode_s: float
    throughput_tok_s: float
    stage_prefill_ms: tuple[float, ...]
    stage_decode_ms: tuple[float, ...]
    comm_prefill_ms: tuple[float, ...]
    comm_decode_ms: tuple[float, ...]
    memory: tuple[StageMemory, ...]
    fits: bool
    bottleneck_stage: int
    stages: tuple[StageAssignment, ...] = ()  # the plan's stages with every kernel resolved


def job_prefill_ms(ctx: CostContext, device: str, bits: int, kernel: str, b_p: int) -> float:
    """One layer's prefill busy time over the job on `kernel` (ms): K_p·t_prefill(b_p, q = c = s)."""
    s = ctx.workload.prompt_len
    return micro_batches(ctx.workload.batch, b_p) * ctx.latency.layer_ms(device, bits, "prefill", b_p, s, s, kernel)


def job_decode_ms(ctx: CostContext, device: str, bits: int, kernel: str, b_d: int) -> float:
    """One layer's decode busy time over the job on `kernel` (ms): K_d·(n − 1)·t_decode(b_d, c = s + max(1, n // 2))."""
    w = ctx.workload
    if w.gen_len <= 1:
        return 0.0
    mid = w.prompt_len + max(1, w.gen_len // 2)
    return micro_batches(w.batch, b_d) * (w.gen_len - 1) * ctx.latency.layer_ms(device, bits, "decode", b_d, 1, mid,
                                                                                kernel)


def choose_kernel(ctx: CostContext, device: str, bits: int, b_p: int, b_d: int,
                  prefill: Callable[..., float] = job_prefill_ms, decode: Callable[..., float] = job_decode_ms) -> str:
    """The kernel a stage on `device` runs its `bits`-bit layers with at micro-batches (b_p, b_d): of the device's
    menu, the least busy time of one layer over the job, `job_prefill_ms` + `job_decode_ms` (ties: the kernel
    table's order). `prefill`/`decode` may be memoised versions of those two (same values)."""
    names = ctx.latency.kernels_for(device, bits)
    if len(names) == 1:
        return names[0]
    return min(names, key=lambda k: (prefill(ctx, device, bits, k, b_p) + decode(ctx, device, bits, k, b_d),
                                     names.index(k)))


def with_kernels(ctx: CostContext, stage: StageAssignment, b_p: int, b_d: int) -> StageAssignment:
    """`stage` with a kernel for each of its bit-widths: its own where it names them, else `choose_kernel`'s."""
    if stage.kernels:
        return stage
    return replace(stage, kernels=tuple((b, choose_kernel(ctx, stage.device, b, b_p, b_d)) for b in set(stage.bits)))


def kernel_specs(ctx: CostContext, stage: StageAssignment) -> dict:
    """bits -> KernelSpec of a stage whose kernels are resolved."""
    return {b: ctx.latency.kernels.spec(k) for b, k in stage.kernels}


def _stage_ms_many(ctx: CostContext, stage: StageAssignment, phase: str, batch: int, q_tokens: int,
                   contexts: np.ndarray, *, first: bool, last: bool, pipelined: bool) -> np.ndarray:
    """t_j at many context lengths (ms): `stage_time_ms`'s formula."""
    total = np.zeros(len(contexts))
    kernels = stage.kernel_map
    for bits in sorted(set(stage.bits)):
        count = stage.bits.count(bits)
        total += count * ctx.latency.layer_ms_many(stage.device, bits, phase, batch, q_tokens, contexts,
                                                   kernels.get(bits))
    if pipelined:
        total += len(stage.bits) * ctx.latency.after_idle_ms(stage.device, phase)
    if first:
        total += ctx.latency.embed_ms(stage.device, phase, batch, q_tokens)
    if last:
        total += ctx.latency.head_ms(stage.device, phase, batch)
    return total + ctx.latency.loop_ms(stage.device, phase, batch)


def stage_time_ms(ctx: CostContext, stage: StageAssignment, phase: str, batch: int, context_len: int, *,
                  first: bool, last: bool, pipelined: bool = False) -> float:
    """t_j = Σ_{i in stage} (t_layer(device, b_i, phase, batch, q, c) + t_idle) + t_embed (first) + t_head (last)
    + t_loop(device, phase, batch) (ms), without the stage's cost of sending its message (`estimate` adds
    `message_times_ms`).

    Prefill: q = c = context_len (the prompt); decode: q = 1 new token over context c. t_idle (the device's
    after-idle cost per layer, `LatencyModel.after_idle_ms`) applies to a stage of a multi-stage pipeline
    (`pipelined`), which waits for its input before every step; t_loop is the stage loop's own cost per step
    (`LatencyModel.loop_ms`). Both come from the device's profile (0 without one).
    """
    q = context_len if phase == "prefill" else 1
    return float(_stage_ms_many(ctx, stage, phase, batch, q, np.asarray([context_len]), first=first, last=last,
                                pipelined=pipelined)[0])


def _ring_edges(ctx: CostContext, stages: Sequence[StageAssignment], batch: int,
                tokens: int) -> Iterator[tuple[StageAssignment, StageAssignment, int]]:
    """(sender, receiver, payload bytes) of each ring edge j → j+1: b·tokens·hidden in the sender's dtype, the last
    stage's edge back to the first b token ids."""
    n = len(stages)
    for j, stage in enumerate(stages):
        yield stage, stages[(j + 1) % n], sent_bytes(ctx.shape, ctx.devices[stage.device], batch, tokens,
                                                     returns=j == n - 1)


def link_times_ms(ctx: CostContext, stages: Sequence[StageAssignment], batch: int, tokens: int) -> tuple[float, ...]:
    """c_j for j = 0..N−1: the transfer over link j → j+1 (`_ring_edges`'s payloads). A one-stage pipeline has no
    link (c_0 = 0)."""
    if len(stages) == 1:
        return (0.0,)
    return tuple(transfer_ms(link_between(ctx.cluster, a.node, b.node, ctx.links), payload)
                 for a, b, payload in _ring_edges(ctx, stages, batch, tokens))


def message_times_ms(ctx: CostContext, stages: Sequence[StageAssignment], batch: int,
                     tokens: int) -> tuple[float, ...]:
    """m_j for j = 0..N−1: what stage j pays in its own time per step to send its message while every stage computes
    (`comm.message_ms`); 0 for one stage."""
    if len(stages) == 1:
        return (0.0,)
    return tuple(message_ms(ctx.cluster, a.node, b.node, ctx.per_message, payload)
                 for a, b, payload in _ring_edges(ctx, stages, batch, tokens))


def check_stages(ctx: CostContext, stages: Sequence[StageAssignment]) -> None:
    """Stages must cover layers 0..L−1 contiguously, on known devices and nodes, at bits with a kernel on the device
    (and on the kernels the stage names, if any, from the device's menu)."""
    if not stages:
        raise ValueError("a plan needs at least one stage")
    nodes = {n.name for n in ctx.cluster.nodes}
    expected = 0
    for j, s in enumerate(stages):
        if s.start != expected:
            raise ValueError(f"stage {j} starts at layer {s.start}, expected {expected} (stages must be contiguous)")
        if s.device not in ctx.devices:
            raise ValueError(f"stage {j}: unknown device {s.device!r}")
        if s.node not in nodes:
            raise ValueError(f"stage {j}: unknown node {s.node!r} in cluster {ctx.cluster.name}")
        menu = ctx.latency.menu(s.device)
        bad = sorted(set(s.bits) - set(menu))
        if bad:
            raise ValueError(f"stage {j}: device {s.device} has no kernel for bits {bad}")
        for b, k in s.kernels:
            if k not in menu[b]:
                raise ValueError(f"stage {j}: kernel {k!r} cannot run {b}-bit layers on device {s.device} "
                                 f"(its menu for {b} bits: {', '.join(menu[b])})")
        expected = s.end
    if expected != ctx.shape.num_layers:
        raise ValueError(f"stages cover {expected} layers, the model has {ctx.shape.num_layers}")


def estimate(ctx: CostContext, stages: Sequence[StageAssignment], b_p: int, b_d: int) -> Estimate:
    """Exact prediction of a plan: T_p + T_d over all n − 1 decode rounds (pipeline formulas), throughput, memory.
    Stages without kernels get `choose_kernel`'s (`Estimate.stages` holds them resolved)."""
    check_stages(ctx, stages)
    stages = tuple(with_kernels(ctx, st, b_p, b_d) for st in stages)
    w = ctx.workload
    s, n, last_j = w.prompt_len, w.gen_len, len(stages) - 1
    k_p, k_d = micro_batches(w.batch, b_p), micro_batches(w.batch, b_d)

    pipelined = len(stages) > 1
    msg_p, msg_d = message_times_ms(ctx, stages, b_p, s), message_times_ms(ctx, stages, b_d, 1)
    prefill_stage = tuple(
        float(_stage_ms_many(ctx, st, "prefill", b_p, s, np.asarray([s]), first=j == 0, last=j == last_j,
                             pipelined=pipelined)[0]) + msg_p[j]
        for j, st in enumerate(stages))
    prefill = PhaseTimes(prefill_stage, link_times_ms(ctx, stages, b_p, s))

    k_mid = max(1, n // 2)
    contexts = s + np.arange(1, max(n, 2), dtype=float)  # rounds k = 1..n−1 (k_mid too when n = 1)
    decode_stage = np.stack([_stage_ms_many(ctx, st, "decode", b_d, 1, contexts, first=j == 0, last=j == last_j,
                                            pipelined=pipelined) + msg_d[j]
                             for j, st in enumerate(stages)])
    comm_decode = link_times_ms(ctx, stages, b_d, 1)
    rounds = [PhaseTimes(tuple(map(float, decode_stage[:, k - 1])), comm_decode) for k in range(1, n)]

    timing = pipeline_time(prefill, rounds, k_p, k_d)
    busy = k_p * np.asarray(prefill_stage) + k_d * decode_stage[:, : n - 1].sum(axis=1)
    memory = tuple(stage_memory(ctx.shape, ctx.devices[st.device], st.bits, w, b_p, b_d, ctx.quant,
                                first=j == 0, last=j == last_j, kernels=kernel_specs(ctx, st))
                   for j, st in enumerate(stages))
    return Estimate(
        prefill_s=timing.prefill_ms / 1e3,
        decode_s=timing.decode_ms / 1e3,
        throughput_tok_s=throughput_tok_s(w.batch, n, timing),
        stage_prefill_ms=prefill_stage,
        stage_decode_ms=tuple(map(float, decode_stage[:, k_mid - 1])),
        comm_prefill_ms=prefill.comm_ms,
        comm_decode_ms=comm_decode,
        memory=memory,
        fits=all(m.fits for m in memory),
        bottleneck_stage=int(np.argmax(busy)),
        stages=stages,
    )
