"""A cheap lower bound on the surrogate of every micro-batch pair of one device order, vectorised.

Per phase (prefill, or a sampled decode round): stage j has fixed time f_j (embedding/head) and per-layer
time t[j,c] at bits c; u_j = ⌊(capacity_j − fixed_j) / smallest layer bytes⌋ bounds its layer count;
ω_c = min_i ω[i,c]; Ω the budget. With G(cost) = min{Σ_j n_j·cost_j : 1 ≤ n_j ≤ u_j, Σ_j n_j = L}
(one layer per stage, the rest on the cheapest stages first), every plan of the branch satisfies, for
every λ ≥ 0 (Lagrangian relaxation of the budget) and every distribution π over stages:

- R − Σc ≥ W(λ) = Σ_j f_j + G(min_c (t[j,c] + λ·ω_c)) − λ·Ω;
- β ≥ Σ_j π_j·t_j ≥ Σ_j π_j·f_j + G(min_c (π_j·t[j,c] + λ·ω_c)) − λ·Ω;
- β ≥ β* = min{β : Σ_j min(u_j, ⌊(β − f_j)/τ_j⌋) ≥ L, β ≥ f_j + τ_j}, τ_j = min_c t[j,c] (bisection);

the bound takes the best λ of a small grid (0 and the exchange rates Δt/Δω between bit-widths) and
π ∝ 1/t[·,c] for each bit-width c; β ≥ max c as well. The surrogate F is non-decreasing in every R and
β, so F evaluated at these values bounds it from below. A pair is memory-infeasible when some u_j < 1
or Σ u_j < L.

Those phase bounds let each phase pick its own bit-widths; a layer has one. Where the phases disagree (with
real kernels, prefill is fastest at 16 bits and decode at 4), the coupled bound (`_coupled`) is tighter: for a
distribution π, F ≥ Σ_j Σ_{i in j} cost_j(c_i) + constants, with β ≥ Σ_j π_j·t_j in every phase, each cycle
≥ K_d·β (or ≥ R), so cost_j(c) = (1 + (K_p − 1)·π_j)·t^p[j,c] + Σ_k coef_jk·t^d[j,c,k] is one linear cost per
layer and bit-width over both phases, minimised under memory by the same convex fill; π is uniform, or uniform
over the stages of one device type (where the bottleneck of a heterogeneous pipeline usually is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmpq.costmodel.pipeline import micro_batches

from .tables import CostCache, Slot

BISECTION_STEPS = 40


def micro_batch_sizes(batch: int) -> tuple[int, ...]:
    """Every useful micro-batch size: the smallest b giving each K = ceil(B/b), i.e. {ceil(B/K) : K = 1..B}."""
    return tuple(sorted({-(-batch // k) for k in range(1, batch + 1)}))


@dataclass(frozen=True, eq=False)
class PairBounds:
    """Lower bounds of one order over the grid b_p × b_d (rows: `prefill_sizes`, columns: `decode_sizes`)."""

    prefill_sizes: tuple[int, ...]
    decode_sizes: tuple[int, ...]
    lower: np.ndarray       # [Bp, Bd] ms; inf where infeasible (memory or budget)
    max_layers: np.ndarray  # [Bp, Bd] Σ_j u_j where memory allows a plan, else 0


class StemArrays:
    """Per-device-stem cost arrays over micro-batch sizes, computed once per search from the cost cache."""

    def __init__(self, cache: CostCache, bits: Sequence[int], points: Sequence[int]):
        ctx = cache.ctx
        self.cache, self.bits, self.points = cache, tuple(bits), tuple(points)
        self.sizes = micro_batch_sizes(ctx.workload.batch)
        self._memo: dict = {}

    def get(self, stem: str) -> dict[str, np.ndarray]:
        if stem not in self._memo:
            self._memo[stem] = self._make(stem)
        return self._memo[stem]

    def _make(self, stem: str) -> dict[str, np.ndarray]:
        cache, sizes, bits, points = self.cache, self.sizes, self.bits, self.points
        ok = [b in cache.ctx.latency.menu(stem) for b in bits]
        nb, C, P = len(sizes), len(bits), max(len(points), 1)
        # times of the kernel each pair (b_p, b_d) runs each bit-width with (`CostCache.kernel`): [b_p, b_d, C(, P)]
        t_p, t_d = np.full((nb, nb, C), np.inf), np.full((nb, nb, C, P), np.inf)
        nbytes = np.full((nb, C), np.inf)
        for i, b in enumerate(sizes):
            for c, bb in enumerate(bits):
                if ok[c]:
                    nbytes[i, c] = cache.layer_bytes(stem, bb, b)
                    for k, bd in enumerate(sizes):
                        kern = cache.kernel(stem, bb, b, bd)
                        t_p[i, k, c] = cache.layer_prefill_ms(stem, bb, b, kern)
                        if points:
                            t_d[i, k, c] = cache.layer_decode_ms(stem, bb, bd, tuple(points), kern)
        fixed = {}
        for first in (False, True):
            for last in (False, True):
                f_p = np.asarray([cache.fixed_ms(stem, "prefill", b, first=first, last=last) for b in sizes])
                f_d = np.asarray([cache.fixed_ms(stem, "decode", b, first=first, last=last) for b in sizes])
                mem = np.asarray([[cache.fixed_memory(stem, bp, bd, first=first, last=last).total_bytes
                                   for bd in sizes] for bp in sizes], dtype=float)
                fixed[first, last] = (f_p, f_d, mem)
        capacity = float(cache.fixed_memory(stem, 1, 1, first=False, last=False).capacity_bytes)
        return {"t_p": t_p, "t_d": t_d, "bytes": nbytes, "fixed": fixed, "capacity": capacity,
                "any_bits": np.asarray(any(ok))}


def _min_max_bound(f: np.ndarray, tau: np.ndarray, cap: np.ndarray, layers: int) -> np.ndarray:
    """β* over the leading axes (stages on the last axis) by bisection; f, tau, cap broadcast together."""
    f, tau, cap = np.broadcast_arrays(f, tau, cap)
    lo = (f + tau).max(axis=-1)
    hi = np.maximum((f + tau * np.maximum(cap, 1)).max(axis=-1), lo)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        fit = np.clip(np.floor((mid[..., None] - f) / tau), 0, cap).sum(axis=-1)
        ok = fit >= layers
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return lo


def _fill(cost: np.ndarray, cap: np.ndarray, layers: int) -> np.ndarray:
    """G: one layer per stage, the others on the cheapest stages up to their caps (stages on the last axis)."""
    cost, cap = np.broadcast_arrays(cost, cap)
    n = cost.shape[-1]
    order = np.argsort(cost, axis=-1, kind="stable")
    cs = np.take_along_axis(cost, order, axis=-1)
    room = np.maximum(np.take_along_axis(cap, order, axis=-1) - 1, 0)
    before = np.cumsum(room, axis=-1) - room
    extra = np.clip(layers - n - before, 0, room)
    return cs.sum(axis=-1) + np.where(extra > 0, cs * extra, 0.0).sum(axis=-1)


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, idx[..., None], axis=-1)[..., 0]


def _convex_fill(cost: np.ndarray, nbytes: np.ndarray, room: np.ndarray, layers: int) -> np.ndarray:
    """G with bit-widths mixed under each stage's memory (fractional), stages on axis −2, bits on axis −1.

    h_j(n) = min{Σ_c x_c·cost_jc : Σ_c x_c = n, Σ_c x_c·bytes_jc ≤ room_j} is convex and piecewise linear
    in n: slope cost_a of the cheapest bit-width a up to room/bytes_a layers, then, trading layers for
    smaller ones along the lower hull, slope (m_a·cost_b − m_b·cost_a)/(m_a − m_b) up to room/bytes_b.
    G = Σ_j (the first layer's slope) + the L − N cheapest further units over all stages' pieces.
    """
    shape = np.broadcast_shapes(cost.shape, nbytes.shape, room.shape + (1,))
    cost, nbytes = np.broadcast_to(cost, shape), np.broadcast_to(nbytes, shape)
    room = np.broadcast_to(room, shape[:-1])
    C = cost.shape[-1]
    finite = np.isfinite(cost)
    cheapest = cost.min(axis=-1, keepdims=True)
    a = np.argmin(np.where(cost == cheapest, nbytes, np.inf), axis=-1)
    cur_c, cur_m = _take(cost, a), _take(nbytes, a)
    slopes, ends = [cur_c], [room / cur_m]
    for _ in range(C - 1):
        smaller = finite & (nbytes < cur_m[..., None])
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = (cur_m[..., None] * cost - nbytes * cur_c[..., None]) / (cur_m[..., None] - nbytes)
        slope = np.where(smaller, slope, np.inf)
        b = np.argmin(slope, axis=-1)
        sb = _take(slope, b)
        has = np.isfinite(sb)
        new_m = np.where(has, _take(nbytes, b), cur_m)
        slopes.append(np.where(has, sb, np.inf))
        ends.append(room / new_m)
        cur_c, cur_m = np.where(has, _take(cost, b), cur_c), new_m
    slope = np.stack(slopes, axis=-1)                                   # [..., N, C]
    end = np.maximum(np.stack(ends, axis=-1) - 1.0, 0.0)                # the first layer is paid apart
    length = np.diff(np.concatenate([np.zeros(end.shape[:-1] + (1,)), np.maximum.accumulate(end, axis=-1)],
                                    axis=-1), axis=-1)
    first = slope[..., 0].sum(axis=-1)
    flat_s = slope.reshape(slope.shape[:-2] + (-1,))
    flat_l = length.reshape(length.shape[:-2] + (-1,))
    order = np.argsort(flat_s, axis=-1, kind="stable")
    ss, ll = np.take_along_axis(flat_s, order, axis=-1), np.take_along_axis(flat_l, order, axis=-1)
    need = layers - cost.shape[-2]
    before = np.cumsum(ll, axis=-1) - ll
    take = np.clip(need - before, 0.0, ll)
    extra = (np.where(take > 0, ss, 0.0) * take).sum(axis=-1)
    enough = ll.sum(axis=-1) >= need - 1e-9
    return np.where(enough, first + extra, np.inf)


def _lambdas(t_mean: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """λ grid [..., Λ]: 0 and the exchange rates (t_a − t_b)/(ω_b − ω_a) between bit-widths adjacent in ω
    (t_mean [..., C]): where the dual of the budget is piecewise linear, these are its likely kinks."""
    out = [np.zeros(t_mean.shape[:-1])]
    by_omega = np.argsort(omega, kind="stable")
    for a, b in zip(by_omega, by_omega[1:]):
        if omega[b] > omega[a]:
            rate = (t_mean[..., a] - t_mean[..., b]) / (omega[b] - omega[a])
            out.append(np.where(np.isfinite(rate) & (rate > 0), rate, 0.0))
    return np.stack(out, axis=-1)


def _pi_columns(t: np.ndarray, omega: np.ndarray, budget: float, layers: int) -> list[int]:
    """Bit-widths whose speed ratios weight the stages in the π bounds: those the budget allows for all layers
    and the next one up in ω (with a budget); the fastest on average (without)."""
    mean = np.nanmean(np.where(np.isfinite(t), t, np.nan), axis=tuple(range(t.ndim - 1)))
    if not np.isfinite(budget):
        return [int(np.nanargmin(mean))]
    by_omega = [int(c) for c in np.argsort(omega, kind="stable")]
    inside = [c for c in by_omega if omega[c] * layers <= budget]
    beyond = [c for c in by_omega if omega[c] * layers > budget][:1]
    return inside + beyond


def _phase(f: np.ndarray, t: np.ndarray, cap: np.ndarray, nbytes: np.ndarray, room: np.ndarray, omega: np.ndarray,
           budget: float, layers: int, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """(lower bound on Σ_j t_j, lower bound on max_j t_j) over the pair grid; f [.., N], t [.., N, C], cap and
    room [.., N] (layers, bytes), nbytes [.., N, C] (one layer's bytes). Without `full`, only W_cap and β*."""
    N = t.shape[-2]
    tau = t.min(axis=-1)
    beta = _min_max_bound(f, tau, cap, layers)
    if not full:
        work = f.sum(axis=-1) + _fill(tau, cap, layers)
        return work, np.maximum(beta, work / N)
    bounded = np.isfinite(budget)
    finite_t = np.where(np.isfinite(t), t, np.nan)
    lam = _lambdas(np.nanmean(finite_t, axis=-2), omega) if bounded else np.zeros(t.shape[:-2] + (1,))
    pen = lam[..., None, None, :] * omega[None, :, None]                       # [.., 1, C, Λ]
    cost = np.moveaxis(t[..., None] + pen, -1, -3)                             # [.., Λ, N, C]
    work = f.sum(axis=-1)[..., None] + _convex_fill(cost, nbytes[..., None, :, :], room[..., None, :], layers)
    if bounded:
        work = work - lam * budget
    work = np.maximum(work.max(axis=-1), f.sum(axis=-1) + _fill(tau, cap, layers))
    for c in _pi_columns(t, omega, budget, layers):
        inv = np.where(np.isfinite(t[..., c]), 1.0 / np.where(t[..., c] > 0, t[..., c], np.inf), 0.0)
        total = inv.sum(axis=-1, keepdims=True)
        if not np.all(total > 0):
            continue
        pi = inv / total                                                        # [.., N]
        lam_pi = _lambdas((pi[..., None] * finite_t).sum(axis=-2), omega) if bounded else lam
        pen = lam_pi[..., None, None, :] * omega[None, :, None]
        cost = np.moveaxis((pi[..., None] * t)[..., None] + pen, -1, -3)
        value = (pi * f).sum(axis=-1)[..., None] + _convex_fill(cost, nbytes[..., None, :, :], room[..., None, :],
                                                                layers)
        if bounded:
            value = value - lam_pi * budget
        beta = np.maximum(beta, value.max(axis=-1))
    return work, np.maximum(beta, work / N)


def _coupled(f_p: np.ndarray, t_p: np.ndarray, c_p: np.ndarray, f_d: np.ndarray, t_d: np.ndarray,
             c_d: np.ndarray, k_p: np.ndarray, k_d: np.ndarray, weights: np.ndarray, nbytes: np.ndarray,
             room: np.ndarray, omega: np.ndarray, budget: float, layers: int, groups: Sequence[np.ndarray]) -> np.ndarray:
    """The coupled lower bound on F (module docstring) over pairs: f_* [.., N], t_p [.., N, C], t_d [.., N, C, P],
    c_* [.., N], k_* [..], weights [P] (cycle weights; the last point also drains), nbytes [.., N, C], room [.., N].
    The best over π ∈ {uniform, uniform over the stages of one device type (`groups`: masks [N])} and
    cycle ≥ K_d·β or ≥ R."""
    N, P = t_p.shape[-2], t_d.shape[-1]
    kp, kd = k_p[..., None], k_d[..., None]
    pis = [np.full(f_p.shape, 1.0 / N)]
    pis += [np.broadcast_to(g / g.sum(), f_p.shape) for g in groups if 0 < g.sum() < N]
    best = np.full(f_p.shape[:-1], -np.inf)
    bounded = np.isfinite(budget)
    for pi in pis:
        for by_beta in (True, False):
            a = 1.0 + (kp - 1.0) * pi                                           # [.., N]
            cost = a[..., None] * t_p
            const = (a * f_p).sum(axis=-1) + c_p.sum(axis=-1)
            for q in range(P):
                coef = np.zeros_like(pi)
                if weights[q] > 0:
                    coef = coef + weights[q] * (kd * pi if by_beta else 1.0)
                    if not by_beta:
                        const = const + weights[q] * c_d.sum(axis=-1)
                if q == P - 1:
                    coef = coef + 1.0 + (kd - 1.0) * pi
                    const = const + c_d.sum(axis=-1)
                cost = cost + coef[..., None] * t_d[..., q]
                const = const + (coef * f_d).sum(axis=-1)
            lam = _lambdas(np.nanmean(np.where(np.isfinite(cost), cost, np.nan), axis=-2), omega) if bounded \
                else np.zeros(cost.shape[:-2] + (1,))
            pen = lam[..., None, None, :] * omega[None, :, None]
            full = np.moveaxis(cost[..., None] + pen, -1, -3)                   # [.., Λ, N, C]
            value = const[..., None] + _convex_fill(full, nbytes[..., None, :, :], room[..., None, :], layers)
            if bounded:
                value = value - lam * budget
            best = np.maximum(best, value.max(axis=-1))
    return best


def order_bounds(arrays: StemArrays, slots: Sequence[Slot], layers: int, cycle_weights: Sequence[float],
                 omega_min: Sequence[float] | None = None, budget: float = np.inf, full: bool = True,
                 pairs: np.ndarray | None = None) -> PairBounds:
    """PairBounds of one device order (see the module docstring); `omega_min[c]` = min_i ω[i, bits[c]].

    `full=False` keeps only W_cap and β* (no budget, no mixing, no π): a weaker bound, several times faster,
    for ranking orders before their full bounds are needed. `pairs` [Bp, Bd] (bool) limits the work to
    those pairs (the others get inf).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        return _order_bounds(arrays, slots, layers, cycle_weights, omega_min, budget, full, pairs)


def _order_bounds(arrays: StemArrays, slots: Sequence[Slot], layers: int, cycle_weights: Sequence[float],
                  omega_min: Sequence[float] | None, budget: float, full: bool,
                  pairs: np.ndarray | None) -> PairBounds:
    cache, sizes, points = arrays.cache, arrays.sizes, arrays.points
    w = cache.ctx.workload
    nb, N, last = len(sizes), len(slots), len(slots) - 1
    stem_arrays = [arrays.get(stem) for _, stem in slots]
    if N > layers or not all(bool(a["any_bits"]) for a in stem_arrays):
        return PairBounds(sizes, sizes, np.full((nb, nb), np.inf), np.zeros((nb, nb)))
    t_p = np.stack([a["t_p"] for a in stem_arrays], axis=2)               # [b_p, b_d, N, C]
    t_d = np.stack([a["t_d"] for a in stem_arrays], axis=2)               # [b_p, b_d, N, C, P]
    nbytes = np.stack([a["bytes"] for a in stem_arrays], axis=1)          # [b_d, N, C]
    parts = [a["fixed"][j == 0, j == last] for j, a in enumerate(stem_arrays)]
    f_p = np.stack([p[0] for p in parts], axis=1)                         # [b, N]
    f_d = np.stack([p[1] for p in parts], axis=1)
    fixed = np.stack([p[2] for p in parts], axis=-1)                      # [b_p, b_d, N]
    capacity = np.asarray([a["capacity"] for a in stem_arrays])
    if N == 1:
        c_p, c_d = np.zeros((nb, 1)), np.zeros((nb, 1))
    else:
        nxt = [slots[(j + 1) % N] for j in range(N)]
        c_p = np.asarray([[cache.link_ms(slots[j], nxt[j], b, w.prompt_len, returns=j == last) for j in range(N)]
                          for b in sizes])
        c_d = np.asarray([[cache.link_ms(slots[j], nxt[j], b, 1, returns=j == last) for j in range(N)] for b in sizes])

    cap = np.floor((capacity - fixed) / nbytes.min(axis=-1)[None, :, :])  # [b_p, b_d, N]
    feasible = (cap >= 1).all(axis=-1) & (cap.sum(axis=-1) >= layers)
    cap = np.clip(cap, 0, layers)
    omega = np.zeros(t_p.shape[-1]) if omega_min is None else np.asarray(omega_min, dtype=float)
    k = np.asarray([micro_batches(w.batch, b) for b in sizes], dtype=float)
    wanted = feasible if pairs is None else feasible & pairs
    ip, idd = np.nonzero(wanted)                                            # the pairs to bound, flattened
    lower = np.full((nb, nb), np.inf)
    if len(ip):
        room = (capacity - fixed)[ip, idd]                                  # [P, N]
        cap_s, nb_s = cap[ip, idd], nbytes[idd]
        w_p, beta_p = _phase(f_p[ip], t_p[ip, idd], cap_s, nb_s, room, omega, budget, layers, full)
        flat = w_p + c_p[ip].sum(axis=-1) + (k[ip] - 1) * np.maximum(beta_p, c_p[ip].max(axis=-1))
        weights = np.asarray(cycle_weights, dtype=float)
        for p in range(len(points)):
            w_d, beta = _phase(f_d[idd], t_d[ip, idd, :, :, p], cap_s, nb_s, room, omega, budget, layers, full)
            beta = np.maximum(beta, c_d[idd].max(axis=-1))
            r_d = w_d + c_d[idd].sum(axis=-1)
            if weights[p] > 0:
                flat = flat + weights[p] * np.maximum(k[idd] * beta, r_d)
            if p == len(points) - 1:
                flat = flat + r_d + (k[idd] - 1) * beta
        if full and len(points):
            stems = [stem for _, stem in slots]
            groups = [np.asarray([x == stem for x in stems], dtype=float) for stem in dict.fromkeys(stems)]
            flat = np.maximum(flat, _coupled(f_p[ip], t_p[ip, idd], c_p[ip], f_d[idd], t_d[ip, idd], c_d[idd], k[ip],
                                             k[idd], weights, nb_s, room, omega, budget, layers, groups))
        lower[ip, idd] = np.where(np.isfinite(flat), flat, np.inf)
    return PairBounds(sizes, sizes, lower, np.where(feasible, cap.sum(axis=-1), 0))


def throughput_upper_bound(cache: CostCache) -> float:
    """An upper bound on the predicted throughput of any plan of the cluster (tok/s): the per-cluster roofline bound.

    Per phase, the layers' work perfectly balanced over all N devices at each device's fastest bit-width and
    kernel, with the best micro-batch size, ignoring memory, links, the embedding and the head:
    T_p ≥ min_b K_p(b)·L / Σ_j 1/t^p_j(b) and T_d ≥ min_b Σ_{k=1..n−1} K_d(b)·L / Σ_j 1/t^d_j(b, s + k), with
    t_j the least layer time over the device's menu (a stage's busy time is at least its share of the work, and the
    slowest stage is at least the balanced one). Throughput ≤ B·n / (T_p + T_d).
    """
    ctx = cache.ctx
    w = ctx.workload
    s, n, layers = w.prompt_len, w.gen_len, ctx.shape.num_layers
    slots = [stem for _, stem in ctx.cluster.device_slots()]
    contexts = s + np.arange(1, max(n, 2), dtype=float)[: max(n - 1, 0)]
    best_p, best_d = np.inf, 0.0 if n <= 1 else np.inf
    for b in micro_batch_sizes(w.batch):
        rate_p = sum(1.0 / min(cache.layer_prefill_ms(st, bits, b) for bits in ctx.latency.menu(st)) for st in slots)
        best_p = min(best_p, micro_batches(w.batch, b) * layers / rate_p)
        if n > 1:
            per = {st: np.min([ctx.latency.layer_ms_many(st, bits, "decode", b, 1, contexts)
                               for bits in ctx.latency.menu(st)], axis=0) for st in set(slots)}
            rate_d = sum(1.0 / per[st] for st in slots)
            best_d = min(best_d, float(np.sum(micro_batches(w.batch, b) * layers / rate_d)))
    return w.batch * n / ((best_p + best_d) / 1e3)
