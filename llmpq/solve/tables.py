"""Numeric tables of one solver branch: a fixed device order and micro-batch pair (b_p, b_d).

Everything the MILP, the bounds, the heuristics and the brute force read is here as plain arrays, so the
optimisation code never calls the cost model. Items g are runs of consecutive layers that share a stage
and a bit-width (one layer each unless layers are grouped); stages j follow the device order; columns c
index `bits`. Times are per micro-batch in ms, memory in bytes.

Surrogate objective of an assignment (design, "The solver"):

    F = R^p + (K_p − 1)·β^p + Σ_k w_k · max(K_d·β^d(k), R^d(k)) + R^d(n−1) + (K_d − 1)·β^d(n−1) + θ·Σω

with β = max_j max(t_j, c_j), R = Σ_j (t_j + c_j), the decode contexts sampled at a few rounds k
(`llmpq.costmodel.pipeline.surrogate_points`, trapezoid weights w_k) and t_j = fixed_j + Σ_{g in j} t[g, j, c_g]:
fixed_j the embedding, head and stage-loop times (and, in a pipeline, the stage's cost of sending its message),
t[g, j, c] the item's layers on stage j's device at bits c, each plus that device's after-idle cost when the
pipeline has more than one stage (`costmodel.estimate`).

Each (stage, column) runs on one weight kernel, the branch's choice for that device, bits and micro-batches
(`costmodel.estimate.choose_kernel`); times are that kernel's. Memory of stage j:
fixed_j + max_{c used on j} workspace[j, c] + Σ_{g in j} mem[g, j, c_g] (the kernels' workspace counts once, the
largest of the columns the stage uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmpq.costmodel import memory as mem
from llmpq.costmodel.comm import link_between, message_ms, sent_bytes, transfer_ms
from llmpq.costmodel.context import CostContext
from llmpq.costmodel.estimate import StageAssignment, choose_kernel, job_decode_ms, job_prefill_ms
from llmpq.costmodel.pipeline import micro_batches, surrogate_cycle_weights, surrogate_points

from .quality import OmegaTable

Slot = tuple[str, str]  # (node, device stem)


class CostCache:
    """Memoised cost terms of one cost context: latency per (device, bits, phase, batch, context), memory, links.

    One instance lives for one search; the memo is private to it.
    """

    def __init__(self, ctx: CostContext):
        self.ctx = ctx
        self._memo: dict[tuple, object] = {}

    def _get(self, key: tuple, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def layer_prefill_ms(self, stem: str, bits: int, batch: int, kernel: str | None = None) -> float:
        """One layer's prefill time on `kernel` (ms); None: the least over the device's kernels (a lower bound)."""
        s = self.ctx.workload.prompt_len
        return self._get(("lp", stem, bits, batch, kernel),
                         lambda: self.ctx.latency.layer_ms(stem, bits, "prefill", batch, s, s, kernel))

    def layer_decode_ms(self, stem: str, bits: int, batch: int, ks: tuple[int, ...],
                        kernel: str | None = None) -> np.ndarray:
        """One layer's decode time at rounds `ks` on `kernel` (ms); None: the least over the device's kernels."""
        s = self.ctx.workload.prompt_len
        return self._get(("ld", stem, bits, batch, ks, kernel), lambda: self.ctx.latency.layer_ms_many(
            stem, bits, "decode", batch, 1, np.asarray([s + k for k in ks], dtype=float), kernel))

    def kernel(self, stem: str, bits: int, b_p: int, b_d: int) -> str:
        """The weight kernel of `bits`-bit layers on `stem` at micro-batches (b_p, b_d) (`choose_kernel`)."""
        def prefill(ctx, device, b, k, size):
            return self._get(("jp", device, b, k, size), lambda: job_prefill_ms(ctx, device, b, k, size))

        def decode(ctx, device, b, k, size):
            return self._get(("jd", device, b, k, size), lambda: job_decode_ms(ctx, device, b, k, size))
        return self._get(("k", stem, bits, b_p, b_d),
                         lambda: choose_kernel(self.ctx, stem, bits, b_p, b_d, prefill, decode))

    def workspace_bytes(self, stem: str, bits: int, kernel: str) -> int:
        """The workspace of `kernel` running `bits`-bit layers on `stem` (`memory.kernel_workspace_bytes`)."""
        ctx = self.ctx
        return self._get(("ws", stem, bits, kernel), lambda: mem.kernel_workspace_bytes(
            ctx.shape, ctx.devices[stem], {bits: ctx.latency.kernels.spec(kernel)} if bits < 16 else {}))

    def fixed_ms(self, stem: str, phase: str, batch: int, *, first: bool, last: bool) -> float:
        """Embedding (first stage) + head (last stage) + the stage loop's own cost of one micro-batch (ms)."""
        q = self.ctx.workload.prompt_len if phase == "prefill" else 1

        def make() -> float:
            t = self.ctx.latency.embed_ms(stem, phase, batch, q) if first else 0.0
            t += self.ctx.latency.loop_ms(stem, phase, batch)
            return t + (self.ctx.latency.head_ms(stem, phase, batch) if last else 0.0)
        return self._get(("fx", stem, phase, batch, first, last), make)

    def layer_bytes(self, stem: str, bits: int, b_d: int) -> int:
        """W_i(b) + KV_i: one layer's weights at `bits` and its KV cache for K_d·b_d sequences at s + n."""
        ctx, w = self.ctx, self.ctx.workload

        def make() -> int:
            dev = ctx.devices[stem]
            return (mem.layer_weight_bytes(ctx.shape, bits, ctx.quant, dev)
                    + mem.layer_kv_bytes(ctx.shape, mem.kv_sequences(w, b_d), w.kv_len, dev))
        return self._get(("lb", stem, bits, b_d), make)

    def fixed_memory(self, stem: str, b_p: int, b_d: int, *, first: bool, last: bool) -> mem.StageMemory:
        return self._get(("fm", stem, b_p, b_d, first, last), lambda: mem.stage_fixed_memory(
            self.ctx.shape, self.ctx.devices[stem], self.ctx.workload, b_p, b_d, first=first, last=last))

    def _payload(self, sender: Slot, batch: int, tokens: int, returns: bool) -> int:
        return sent_bytes(self.ctx.shape, self.ctx.devices[sender[1]], batch, tokens, returns=returns)

    def link_ms(self, sender: Slot, receiver: Slot, batch: int, tokens: int, *, returns: bool) -> float:
        """c_j: α + bytes/BW from `sender` to `receiver`; the return link carries token ids."""
        return self._get(("ln", sender, receiver, batch, tokens, returns), lambda: transfer_ms(
            link_between(self.ctx.cluster, sender[0], receiver[0], self.ctx.links),
            self._payload(sender, batch, tokens, returns)))

    def message_ms(self, sender: Slot, receiver: Slot, batch: int, tokens: int, *, returns: bool) -> float:
        """m_j: what the sending stage pays per step for its message (`comm.message_ms`)."""
        return self._get(("msg", sender, receiver, batch, tokens, returns), lambda: message_ms(
            self.ctx.cluster, sender[0], receiver[0], self.ctx.per_message,
            self._payload(sender, batch, tokens, returns)))


def default_items(num_layers: int) -> tuple[tuple[int, int], ...]:
    """One item per layer: ((0, 1), (1, 2), ...)."""
    return tuple((i, i + 1) for i in range(num_layers))


def grouped_items(num_layers: int, size: int) -> tuple[tuple[int, int], ...]:
    """Runs of `size` consecutive layers (the last may be shorter)."""
    return tuple((i, min(i + size, num_layers)) for i in range(0, num_layers, size))


@dataclass(frozen=True, eq=False)
class ProblemTables:
    """The numeric problem of one branch (see the module docstring for symbols)."""

    slots: tuple[Slot, ...]        # stage j's (node, device stem), pipeline order
    b_p: int
    b_d: int
    k_p: int                       # K_p = ceil(B / b_p)
    k_d: int                       # K_d = ceil(B / b_d)
    bits: tuple[int, ...]          # column c -> bit-width
    items: tuple[tuple[int, int], ...]  # item g -> layers [start, end)
    allowed: np.ndarray            # [N, C] bool: device of stage j has a kernel for bits[c]
    kernels: tuple[tuple[str, ...], ...]  # [N][C] the kernel stage j runs bits[c] with ("" where not allowed)
    workspace: np.ndarray          # [N, C] bytes of that kernel's workspace on stage j
    t_prefill: np.ndarray          # [G, N, C] ms
    t_decode: np.ndarray           # [G, N, C, P] ms at the sampled rounds
    mem_bytes: np.ndarray          # [G, N, C] weights + KV cache
    omega: np.ndarray              # [G, C] Σ of the item's layers' ω
    fixed_prefill: np.ndarray      # [N] embed/head, loop and message ms
    fixed_decode: np.ndarray       # [N] the same for decode (independent of the context)
    comm_prefill: np.ndarray       # [N] link j -> j+1 ms (last: the return link)
    comm_decode: np.ndarray        # [N]
    fixed_mem: np.ndarray          # [N] bytes that do not depend on the layers (reserve included)
    capacity: np.ndarray           # [N] bytes
    points: tuple[int, ...]        # sampled decode rounds k (last = n − 1); empty for n = 1
    cycle_weights: np.ndarray      # [P] trapezoid weight w_k of each sampled round
    budget: float = math.inf       # Ω on Σω
    theta: float = 0.0             # soft penalty, ms per unit of Σω
    mask: np.ndarray | None = None  # [G, N, C] bool: the (stage, column) each item may take (None: all allowed)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_stages(self) -> int:
        return len(self.slots)

    @property
    def n_bits(self) -> int:
        return len(self.bits)

    @property
    def sizes(self) -> np.ndarray:
        return np.asarray([e - s for s, e in self.items])


def build_tables(cache: CostCache, slots: Sequence[Slot], b_p: int, b_d: int, omega: OmegaTable, *,
                 items: tuple[tuple[int, int], ...] | None = None, budget: float = math.inf,
                 theta: float = 0.0, decode_points: int = 3) -> ProblemTables:
    """Tables of the branch (slots, b_p, b_d): per-layer terms from the cost model, scaled to items."""
    ctx, w = cache.ctx, cache.ctx.workload
    slots = tuple(slots)
    n_st, bits = len(slots), omega.bits
    items = items or default_items(omega.num_layers)
    if items[0][0] != 0 or items[-1][1] != omega.num_layers or any(a[1] != b[0] for a, b in zip(items, items[1:])):
        raise ValueError(f"items must cover layers 0..{omega.num_layers - 1} contiguously")
    points = surrogate_points(w.gen_len, decode_points) if w.gen_len > 1 else ()
    weights = dict(surrogate_cycle_weights(w.gen_len, decode_points)) if points else {}
    n_pts = max(len(points), 1)

    allowed = np.asarray([[b in ctx.latency.menu(stem) for b in bits] for _, stem in slots], dtype=bool)
    tp = np.zeros((n_st, len(bits)))
    td = np.zeros((n_st, len(bits), n_pts))
    mb = np.zeros((n_st, len(bits)))
    ws = np.zeros((n_st, len(bits)))
    kernels = []
    for j, (_, stem) in enumerate(slots):
        row = []
        idle_p, idle_d = (ctx.latency.after_idle_ms(stem, p) if n_st > 1 else 0.0 for p in ("prefill", "decode"))
        for c, b in enumerate(bits):
            if not allowed[j, c]:
                row.append("")
                tp[j, c], td[j, c], mb[j, c] = np.inf, np.inf, np.inf
                continue
            kern = cache.kernel(stem, b, b_p, b_d)
            row.append(kern)
            tp[j, c] = cache.layer_prefill_ms(stem, b, b_p, kern) + idle_p
            if points:
                td[j, c] = cache.layer_decode_ms(stem, b, b_d, points, kern) + idle_d
            mb[j, c] = cache.layer_bytes(stem, b, b_d)
            ws[j, c] = cache.workspace_bytes(stem, b, kern)
        kernels.append(tuple(row))
    sizes = np.asarray([e - s for s, e in items], dtype=float)
    om = np.stack([omega.values[s:e].sum(axis=0) for s, e in items])

    last = n_st - 1
    stems = [stem for _, stem in slots]
    fixed_p = np.asarray([cache.fixed_ms(st, "prefill", b_p, first=j == 0, last=j == last)
                          for j, st in enumerate(stems)])
    fixed_d = np.asarray([cache.fixed_ms(st, "decode", b_d, first=j == 0, last=j == last)
                          for j, st in enumerate(stems)])
    if n_st == 1:
        comm_p = comm_d = np.zeros(1)
    else:
        nxt = [slots[(j + 1) % n_st] for j in range(n_st)]
        comm_p = np.asarray([cache.link_ms(slots[j], nxt[j], b_p, w.prompt_len, returns=j == last)
                             for j in range(n_st)])
        comm_d = np.asarray([cache.link_ms(slots[j], nxt[j], b_d, 1, returns=j == last) for j in range(n_st)])
        fixed_p = fixed_p + [cache.message_ms(slots[j], nxt[j], b_p, w.prompt_len, returns=j == last)
                             for j in range(n_st)]
        fixed_d = fixed_d + [cache.message_ms(slots[j], nxt[j], b_d, 1, returns=j == last) for j in range(n_st)]
    fixed_mem, capacity = [], []
    for j, (_, stem) in enumerate(slots):
        fm = cache.fixed_memory(stem, b_p, b_d, first=j == 0, last=j == last)
        fixed_mem.append(fm.total_bytes)
        capacity.append(fm.capacity_bytes)

    return ProblemTables(
        slots=slots, b_p=b_p, b_d=b_d, k_p=micro_batches(w.batch, b_p), k_d=micro_batches(w.batch, b_d),
        bits=tuple(bits), items=tuple(items), allowed=allowed, kernels=tuple(kernels), workspace=ws,
        t_prefill=sizes[:, None, None] * tp[None], t_decode=sizes[:, None, None, None] * td[None],
        mem_bytes=sizes[:, None, None] * mb[None], omega=om,
        fixed_prefill=fixed_p, fixed_decode=fixed_d, comm_prefill=comm_p, comm_decode=comm_d,
        fixed_mem=np.asarray(fixed_mem, dtype=float), capacity=np.asarray(capacity, dtype=float),
        points=tuple(points), cycle_weights=np.asarray([weights.get(k, 0.0) for k in points] or [0.0]),
        budget=float(budget), theta=float(theta))


@dataclass(frozen=True)
class Assignment:
    """A solution of one branch: the stage and the bit column of every item."""

    stage: tuple[int, ...]
    column: tuple[int, ...]


def stage_times(tb: ProblemTables, a: Assignment) -> tuple[np.ndarray, np.ndarray]:
    """t_j^p [N] and t_j^d(k) [N, P] of an assignment (ms)."""
    tp = tb.fixed_prefill.copy()
    td = np.repeat(tb.fixed_decode[:, None], tb.t_decode.shape[-1], axis=1)
    for g, (j, c) in enumerate(zip(a.stage, a.column)):
        tp[j] += tb.t_prefill[g, j, c]
        td[j] += tb.t_decode[g, j, c]
    return tp, td


def surrogate_ms(tb: ProblemTables, a: Assignment) -> float:
    """F of an assignment (module docstring), θ·Σω included."""
    tp, td = stage_times(tb, a)
    r_p = float(tp.sum() + tb.comm_prefill.sum())
    beta_p = float(max(tp.max(), tb.comm_prefill.max()))
    total = r_p + (tb.k_p - 1) * beta_p
    if tb.points:
        beta_d = np.maximum(td.max(axis=0), tb.comm_decode.max())
        r_d = td.sum(axis=0) + tb.comm_decode.sum()
        cycles = np.maximum(tb.k_d * beta_d, r_d)
        total += float(np.dot(tb.cycle_weights, cycles)) + float(r_d[-1] + (tb.k_d - 1) * beta_d[-1])
    return total + tb.theta * omega_of(tb, a)


def omega_of(tb: ProblemTables, a: Assignment) -> float:
    """Σω of an assignment."""
    return math.fsum(float(tb.omega[g, c]) for g, c in enumerate(a.column))


def stage_bytes(tb: ProblemTables, a: Assignment) -> np.ndarray:
    """M_j = fixed_j + max_{c used on j} workspace[j, c] + Σ_{g in j} mem[g, j, c_g] (bytes)."""
    m = tb.fixed_mem.copy()
    work = np.zeros(tb.n_stages)
    for g, (j, c) in enumerate(zip(a.stage, a.column)):
        m[j] += tb.mem_bytes[g, j, c]
        work[j] = max(work[j], tb.workspace[j, c])
    return m + work


def violations(tb: ProblemTables, a: Assignment, omega_tol: float = 1e-9) -> list[str]:
    """Why an assignment is not a valid plan of the branch (empty when it is)."""
    out = []
    if len(a.stage) != tb.n_items or len(a.column) != tb.n_items:
        return [f"assignment has {len(a.stage)} items, tables have {tb.n_items}"]
    if list(a.stage) != sorted(a.stage) or a.stage[0] != 0 or a.stage[-1] != tb.n_stages - 1:
        out.append("stages are not contiguous in pipeline order from the first to the last")
    if set(a.stage) != set(range(tb.n_stages)):
        out.append("a stage holds no layer")
    if any(not tb.allowed[j, c] for j, c in zip(a.stage, a.column)):
        out.append("a bit-width without a kernel on its device")
    if tb.mask is not None and any(not tb.mask[g, j, c] for g, (j, c) in enumerate(zip(a.stage, a.column))):
        out.append("an item outside its neighbourhood (mask)")
    over = np.nonzero(stage_bytes(tb, a) > tb.capacity)[0]
    if len(over):
        out.append(f"stages {over.tolist()} exceed memory")
    if omega_of(tb, a) > tb.budget * (1 + omega_tol) + omega_tol:
        out.append("quality budget exceeded")
    return out


def to_stages(tb: ProblemTables, a: Assignment) -> tuple[StageAssignment, ...]:
    """The assignment as StageAssignments (layers [start, end), per-layer bits)."""
    out = []
    for j, (node, stem) in enumerate(tb.slots):
        layer_bits = [tb.bits[c] for g, (jj, c) in enumerate(zip(a.stage, a.column)) if jj == j
                      for _ in range(tb.items[g][1] - tb.items[g][0])]
        start = min(tb.items[g][0] for g, jj in enumerate(a.stage) if jj == j)
        kernels = tuple((b, tb.kernels[j][tb.bits.index(b)]) for b in set(layer_bits))
        out.append(StageAssignment(stem, node, start, start + len(layer_bits), tuple(layer_bits), kernels))
    return tuple(out)


def from_stages(tb: ProblemTables, stages: Sequence[StageAssignment]) -> Assignment:
    """The per-item assignment of a plan on this branch's tables (items must be single layers, or runs the plan
    keeps together)."""
    stage, column = [], []
    for s, e in tb.items:
        j = next(j for j, st in enumerate(stages) if st.start <= s < st.end)
        st = stages[j]
        if e > st.end or len(set(st.bits[s - st.start:e - st.start])) != 1:
            raise ValueError(f"item [{s}, {e}) is split by the plan")
        stage.append(j)
        column.append(tb.bits.index(st.bits[s - st.start]))
    return Assignment(tuple(stage), tuple(column))
