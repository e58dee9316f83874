"""The `runs` table of a deployed plan (one row per stage and phase, measured beside predicted) and its sidecar.

- `wall_ms`: the pipeline's time for the phase, measured on the first stage from the barrier that opens
  the phase until the phase's last token has come back: the median over the deploy's `repeats` runs of the
  schedule, with `wall_ms_min` and `wall_ms_max`; `predicted_ms` is the plan's T_p or T_d.
- `compute_ms` / `wait_ms`: the stage's time computing / blocked on messages in the phase, and `stage_wall_ms`
  the stage's own phase time (compute + wait = stage_wall_ms, up to the loop's own few µs per step; medians);
  `predicted_compute_ms` = steps × the plan's per-micro-batch stage time (decode at mid-generation context).
- `tokens`: tokens generated in one run (B·n), `throughput_tok_s` = B·n / (prefill + decode wall).
- memory, measured from just before the stage loaded anything (`llmpq.runtime.measure`): `peak_memory_bytes`
  the stage's peak (RSS growth on a CPU, the CUDA allocator's peak growth on a GPU), `device_used_bytes` the
  growth of the GPU's used memory (mem_get_info; 0 on a CPU), `rss_growth_bytes`, the process's peak RSS and
  the weights and KV bytes it holds, beside the plan's total (`planned_memory_bytes`) and the capacity.
- `reference_ms`: the idle reference timing the stage took before its schedule; `load_factor` = it over the
  device profile's (`llmpq.profile.reference`; NaN without a profile); above 1.25 the machine was loaded.
- `kernels`: the stage's weight kernels as the plan gave them, "bits:kernel" joined by "," (highest bits first).

The sidecar `<out stem>.tokens.json` holds the prompts, the generated ids [B][n] and host data (and the
logits of the first and last generated tokens when they were recorded).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from ..profile.load import load_factor
from ..solve.plan import Plan
from .job import RunJob
from .measure import PHASES
from .stage import StageReport


def tokens_path(out: str | Path) -> Path:
    """The sidecar of a runs table: `<name>.tokens.json` beside `<name>.parquet`."""
    out = Path(out)
    return out.with_name(out.stem + ".tokens.json")


def phase_walls_ms(reports: Sequence[StageReport]) -> dict[str, list[float]]:
    """The pipeline's wall time per phase in each repetition: the first stage's (it sees the phase's last token
    arrive)."""
    first = reports[0]
    reps = first.repetitions or [first.phases]
    return {p: [float(r[p]["wall_ms"]) for r in reps] for p in PHASES}


def phase_wall_ms(reports: Sequence[StageReport]) -> dict[str, float]:
    """The pipeline's wall time per phase, the median over the repetitions."""
    return {p: float(statistics.median(walls)) for p, walls in phase_walls_ms(reports).items()}


def run_rows(job: RunJob, plan: Plan, reports: Sequence[StageReport]) -> list[dict[str, Any]]:
    """Rows of the `runs` table for one deployed plan."""
    walls, wall = phase_walls_ms(reports), phase_wall_ms(reports)
    total_tokens = job.batch * job.gen_len
    total_ms = wall["prefill"] + wall["decode"]
    throughput = total_tokens / (total_ms / 1e3) if total_ms > 0 else 0.0
    predicted = {"prefill": plan.prefill_s * 1e3, "decode": plan.decode_s * 1e3}
    rows = []
    for spec, stage_plan, report in zip(job.stages, plan.stages, reports):
        factor = load_factor(report.reference_ms, spec.reference_ms)
        for phase in PHASES:
            stats = report.phases[phase]
            per_step = stage_plan.prefill_ms if phase == "prefill" else stage_plan.decode_ms
            rows.append({
                "method": job.method, "stage": spec.index, "device": spec.device, "node": spec.node, "phase": phase,
                "wall_ms": wall[phase], "predicted_ms": predicted[phase],
                "wall_ms_min": min(walls[phase]), "wall_ms_max": max(walls[phase]), "repeats": len(walls[phase]),
                "stage_wall_ms": float(stats["wall_ms"]),
                "compute_ms": stats["compute_ms"], "predicted_compute_ms": stats["steps"] * per_step,
                "wait_ms": stats["wait_ms"], "steps": int(stats["steps"]),
                "tokens": total_tokens, "throughput_tok_s": throughput,
                "predicted_throughput_tok_s": plan.throughput_tok_s,
                "weights_bytes": report.memory["weights_bytes"], "kv_bytes": report.memory["kv_bytes"],
                "peak_memory_bytes": report.memory["peak_memory_bytes"], "rss_bytes": report.memory["rss_bytes"],
                "planned_memory_bytes": spec.planned_total_bytes, "capacity_bytes": spec.capacity_bytes,
                "kernels": ",".join(f"{b}:{k}" for b, k in spec.kernels),
                "rss_growth_bytes": int(report.memory.get("rss_growth_bytes", 0)),
                "device_used_bytes": int(report.memory.get("device_used_bytes", 0)),
                "reference_ms": float(report.reference_ms) if report.reference_ms is not None else math.nan,
                "load_factor": factor,
            })
    return rows


def sidecar(job: RunJob, reports: Sequence[StageReport]) -> dict[str, Any]:
    """The tokens sidecar: prompts, generated ids, per-stage hosts, and recorded logits if any."""
    data: dict[str, Any] = {
        "prompts": [list(p) for p in job.prompts], "tokens": reports[0].tokens,
        "hosts": [r.host for r in reports], "phase_wall_ms": phase_wall_ms(reports),
    }
    if reports[-1].first_logits is not None:
        data["first_logits"] = reports[-1].first_logits
        data["last_logits"] = reports[-1].last_logits
    return data


def write_sidecar(data: dict[str, Any], out: str | Path) -> Path:
    from ..artifacts import write_text

    return write_text(json.dumps(data) + "\n", tokens_path(out))


def read_sidecar(out: str | Path) -> dict[str, Any]:
    """The tokens sidecar of a runs table."""
    return json.loads(tokens_path(out).read_text())
