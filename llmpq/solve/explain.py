"""`llmpq explain plan=PATH`: a plan as a readable table, naming the bottleneck stage."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import Any

from llmpq import paths
from llmpq.config.types import GIB

from .plan import Plan, read_plan


def bits_runs(bits: tuple[int, ...]) -> str:
    """Run-length form of per-layer bits: (8, 8, 8, 4) -> '8x3 4'."""
    parts = []
    for b, run in groupby(bits):
        n = len(list(run))
        parts.append(f"{b}x{n}" if n > 1 else str(b))
    return " ".join(parts)


def explain(plan: Plan) -> str:
    """The plan as text: header, one row per stage (bottleneck marked), totals."""
    head = (f"{plan.method}: {plan.model} on {plan.cluster}, workload {plan.workload}; "
            f"micro-batch prefill {plan.micro_batch_prefill}, decode {plan.micro_batch_decode}"
            + (f"; compute dtype {plan.dtype}" if plan.dtype else ""))
    cols = ("stage", "device", "node", "layers", "bits", "kernels", "memory GiB (used/cap)", "prefill ms", "decode ms", "")
    rows = []
    for j, s in enumerate(plan.stages):
        used, cap = s.memory.total_bytes / GIB, s.memory.capacity_bytes / GIB
        mark = "<- bottleneck" if j == plan.bottleneck_stage else ""
        kernels = " ".join(f"{b}:{k}" for b, k in s.kernels)
        rows.append((str(j), s.device, s.node, f"[{s.start}, {s.end})", bits_runs(s.bits), kernels,
                     f"{used:.3g}/{cap:.3g}",
                     f"{s.prefill_ms:.2f}", f"{s.decode_ms:.3f}", mark))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    gap = "n/a" if plan.gap is None else f"{100 * plan.gap:.2f}%"
    ppl = "n/a" if plan.ppl_increase is None else f"{plan.ppl_increase:.3g}%"
    budget = "none" if plan.budget is None else f"{plan.budget:.4g}"
    tail = [
        f"predicted ({plan.latency_source} latency): prefill {plan.prefill_s:.3f} s, decode {plan.decode_s:.3f} s, "
        f"{plan.throughput_tok_s:.2f} tok/s; bottleneck: stage {plan.bottleneck_stage} "
        f"({plan.stages[plan.bottleneck_stage].device} on {plan.stages[plan.bottleneck_stage].node})",
        f"quality: Σω {plan.omega:.4g} ({plan.omega_source}), budget {budget}, predicted perplexity increase {ppl}",
        f"solver: {plan.status}, gap {gap}, plan from {plan.plan_source}",
    ]
    return "\n".join([head, line(cols), line(tuple("-" * w for w in widths)), *map(line, rows), *tail])


def cli_explain(exp: Any, args: Any) -> int:
    """`llmpq explain [plan=PATH]` (default: the configured experiment's plan path)."""
    path = args.plan or paths.plan_path(Path(args.results), exp.model.name, exp.cluster.name, exp.workload.name,
                                        exp.solver.name)
    print(explain(read_plan(path)))
    return 0
