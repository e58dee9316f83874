"""Steps after solve skip a method recorded as infeasible: they write empty artifacts, so that the workflow's
other methods go on, and say so (evaluate lists the method as infeasible from its plan)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from ..artifacts import provenance, write_table, write_text
from .plan import InfeasiblePlan, is_infeasible, read_any_plan


def infeasible_record(plan_path: str | Path) -> InfeasiblePlan | None:
    """The infeasibility record at `plan_path`, or None for a plan to run (or no readable plan: the step's own
    reading reports that)."""
    path = Path(plan_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not is_infeasible(data):
        return None
    record = read_any_plan(path)
    return record if isinstance(record, InfeasiblePlan) else None


def write_skipped(verb: str, record: InfeasiblePlan, tables: Mapping[str, Path], texts: Sequence[Path] = (),
                  config_hash: str = "") -> str:
    """Empty `tables` ({kind: path}) and `texts` marked as skipped; returns the line to print."""
    meta = provenance(config_hash, skipped=f"{record.method}: {record.kind} infeasible")
    for kind, path in tables.items():
        write_table(kind, [], path, meta)
    for path in texts:
        write_text("", path)
    return f"llmpq {verb}: skipped {record.method}: no plan ({record.kind} infeasible): {record.message}"
