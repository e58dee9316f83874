"""The `runs` table of a deployed plan (one row per stage and phase, measured beside predicted) and its sidecar.

- `wall_ms`: the pipeline's time for the phase, measured on the first stage from the barrier that opens
  the phase until the phase's last token has come back; `predicted_ms` is the plan's T_p or T_d.
- `compute_ms` / `wait_ms`: the stage's time computing / blocked on messages in the phase;
  `predicted_compute_ms` = steps × the plan's per-micro-batch stage time (decode at mid-generation context).
- `tokens`: tokens generated in the whole run (B·n), `throughput_tok_s` = B·n / (prefill + decode wall).
- memory: measured weights and KV bytes, peak (CUDA max allocated; on a CPU the tensor bytes held), peak
  RSS and the stage's RSS growth over its pre-load RSS, beside the plan's total and the device's capacity.
- `kernels`: the stage's weight kernels as the plan gave them, "bits:kernel" joined by "," (highest bits first).

The sidecar `<out stem>.tokens.json` holds the prompts, the generated ids [B][n] and host data (and the
logits of the first and last generated tokens when they were recorded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..solve.plan import Plan
from .job import RunJob
from .measure import PHASES
from .stage import StageReport


def tokens_path(out: str | Path) -> Path:
    """The sidecar of a runs table: `<name>.tokens.json` beside `<name>.parquet`."""
    out = Path(out)
    return out.with_name(out.stem + ".tokens.json")


def phase_wall_ms(reports: Sequence[StageReport]) -> dict[str, float]:
    """The pipeline's wall time per phase: the first stage's (it sees the phase's last token arrive)."""
    return {p: float(reports[0].phases[p]["wall_ms"]) for p in PHASES}


def run_rows(job: RunJob, plan: Plan, reports: Sequence[StageReport]) -> list[dict[str, Any]]:
    """Rows of the `runs` table for one deployed plan."""
    wall = phase_wall_ms(reports)
    total_tokens = job.batch * job.gen_len
    total_ms = wall["prefill"] + wall["decode"]
    throughput = total_tokens / (total_ms / 1e3) if total_ms > 0 else 0.0
    predicted = {"prefill": plan.prefill_s * 1e3, "decode": plan.decode_s * 1e3}
    rows = []
    for spec, stage_plan, report in zip(job.stages, plan.stages, reports):
        for phase in PHASES:
            stats = report.phases[phase]
            per_step = stage_plan.prefill_ms if phase == "prefill" else stage_plan.decode_ms
            rows.append({
                "method": job.method, "stage": spec.index, "device": spec.device, "node": spec.node, "phase": phase,
                "wall_ms": wall[phase], "predicted_ms": predicted[phase],
                "compute_ms": stats["compute_ms"], "predicted_compute_ms": stats["steps"] * per_step,
                "wait_ms": stats["wait_ms"], "steps": int(stats["steps"]),
                "tokens": total_tokens, "throughput_tok_s": throughput,
                "predicted_throughput_tok_s": plan.throughput_tok_s,
                "weights_bytes": report.memory["weights_bytes"], "kv_bytes": report.memory["kv_bytes"],
                "peak_memory_bytes": report.memory["peak_memory_bytes"], "rss_bytes": report.memory["rss_bytes"],
                "planned_memory_bytes": spec.planned_total_bytes, "capacity_bytes": spec.capacity_bytes,
                "kernels": ",".join(f"{b}:{k}" for b, k in spec.kernels),
                "rss_growth_bytes": int(report.memory.get("rss_growth_bytes", 0)),
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
