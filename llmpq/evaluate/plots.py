"""Figures a person would rather look at than read: the plan, throughput, latency fidelity, quality vs speed."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BITS_COLOURS = {16: "#1b9e77", 8: "#7570b3", 4: "#e6ab02", 3: "#d95f02", 2: "#e7298a"}
GIB = 1024**3


def _save(fig, path: Path, layout: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MEMORY_PARTS = ("weights_bytes", "kv_bytes", "activations_bytes", "embed_bytes", "head_bytes", "buffers_bytes",
                "reserve_bytes")


def memory_unit(plans: Mapping[str, dict]) -> tuple[str, float]:
    """GiB where the largest capacity is at least 1 GiB, else MiB (the local CPU devices hold a few MiB)."""
    largest = max(s["memory"]["capacity_bytes"] for p in plans.values() for s in p["stages"])
    return ("GiB", float(GIB)) if largest >= GIB else ("MiB", float(2**20))


def plot_plans(plans: Mapping[str, dict], path: Path) -> Path:
    """Per method: layers coloured by bits on their stage's row (left), memory per stage vs capacity (right)."""
    fig, axes = plt.subplots(len(plans), 2, figsize=(11, 1.6 + 1.3 * len(plans)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.3]})
    unit, scale = memory_unit(plans)
    for row, (method, plan) in enumerate(plans.items()):
        ax, mem_ax = axes[row]
        layers = 0
        for j, stage in enumerate(plan["stages"]):
            start, end = stage["layers"]
            layers = max(layers, end)
            for i, bits in zip(range(start, end), stage["bits"]):
                ax.barh(j, 1, left=i, color=BITS_COLOURS.get(bits, "grey"), edgecolor="white")
        ax.set_yticks(range(len(plan["stages"])), [f"{s['device']}@{s['node']}" for s in plan["stages"]])
        ax.set_xticks([i + 0.5 for i in range(0, layers, max(1, layers // 16))],
                      [str(i) for i in range(0, layers, max(1, layers // 16))])
        ax.invert_yaxis()
        ax.set_title(f"{method}: b_p={plan['micro_batch']['prefill']}, b_d={plan['micro_batch']['decode']}", fontsize=9)
        for j, stage in enumerate(plan["stages"]):
            left = 0.0
            for k, name in enumerate(MEMORY_PARTS):
                value = stage["memory"][name] / scale
                mem_ax.barh(j, value, left=left, color=plt.cm.tab10(k))
                left += value
            mem_ax.plot([stage["memory"]["capacity_bytes"] / scale] * 2, [j - 0.4, j + 0.4], color="black")
        mem_ax.invert_yaxis()
        mem_ax.set_yticks([])
    axes[-1][0].set_xlabel("decoder layer")
    axes[-1][1].set_xlabel(f"{unit} per stage (black line: capacity)")
    bit_handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in BITS_COLOURS.values()]
    fig.legend(bit_handles, [f"{b}-bit" for b in BITS_COLOURS], ncol=5, fontsize=8, loc="upper left",
               bbox_to_anchor=(0.02, 1.0), frameon=False)
    part_handles = [plt.Rectangle((0, 0), 1, 1, color=plt.cm.tab10(k)) for k in range(len(MEMORY_PARTS))]
    fig.legend(part_handles, [n.removesuffix("_bytes") for n in MEMORY_PARTS], ncol=4, fontsize=7,
               loc="upper right", bbox_to_anchor=(0.99, 1.0), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path, layout=False)


def plot_throughput(methods: Sequence[str], measured: Sequence[float], predicted: Sequence[float], path: Path) -> Path:
    """Measured vs predicted tokens/s per method."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(methods))
    ax.bar([i - 0.2 for i in x], measured, width=0.4, label="measured")
    ax.bar([i + 0.2 for i in x], predicted, width=0.4, label="predicted")
    ax.set_xticks(list(x), list(methods))
    ax.set_ylabel("generated tokens / s")
    ax.legend()
    return _save(fig, path)


def plot_fidelity(measured_ms: Sequence[float], predicted_ms: Sequence[float], labels: Sequence[str], path: Path) -> Path:
    """Predicted vs measured per-layer latency (log-log), one colour per phase; the diagonal is perfect."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label in sorted(set(labels)):
        xs = [m for m, l in zip(measured_ms, labels) if l == label]
        ys = [p for p, l in zip(predicted_ms, labels) if l == label]
        ax.scatter(xs, ys, s=10, label=label, alpha=0.7)
    lo = min(list(measured_ms) + list(predicted_ms) or [0.01])
    hi = max(list(measured_ms) + list(predicted_ms) or [1.0])
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured layer latency (ms)")
    ax.set_ylabel("cost model (ms)")
    ax.legend(fontsize=7)
    return _save(fig, path)


QUALITY_MIN_SPAN = 0.05  # the perplexity axis spans at least 5% of its largest value


def quality_limits(perplexity: Sequence[float]) -> tuple[float, float]:
    """y-limits that never magnify noise: at least `QUALITY_MIN_SPAN` of the largest value, padded by 10%."""
    lo, hi = min(perplexity), max(perplexity)
    span = max(hi - lo, QUALITY_MIN_SPAN * hi)
    middle = (lo + hi) / 2
    return middle - 0.6 * span, middle + 0.6 * span


def plot_quality(methods: Sequence[str], throughput: Sequence[float], perplexity: Sequence[float], path: Path) -> Path:
    """Perplexity vs measured throughput, one point per method (lower right is better), values written out."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(throughput, perplexity)
    for m, x, y in zip(methods, throughput, perplexity):
        ax.annotate(f"{m} ({y:.2f})", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_ylim(*quality_limits(perplexity))
    ax.set_xlabel("measured tokens / s")
    ax.set_ylabel("perplexity (held-out text)")
    return _save(fig, path)
