"""Every expected solver failure is one line on stderr naming what to change, a non-zero exit, no traceback; with
`infeasible=record` an infeasible method is written as its plan (schema-valid) and deploy/generate skip it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from llmpq.artifacts import read_meta, read_table
from llmpq.cli import main
from llmpq.solve import planner
from llmpq.solve.plan import InfeasiblePlan, InfeasiblePlanError, read_any_plan, read_plan
from llmpq.units import format_bytes

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "plan.schema.json"
C4 = ["cluster=paper-c4", "model=opt-30b", "workload=s512-n100-b32"]


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def one_message(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_format_bytes_picks_a_unit_that_fits():
    assert format_bytes(2 * 1024**2) == "2 MiB" and format_bytes(1.5 * 1024**3) == "1.5 GiB"
    assert format_bytes(512) == "512 B" and format_bytes(3 * 1024) == "3 KiB"


def test_memory_infeasible(tmp_path, capsys):
    code, err = run(capsys, "solve", "cluster=paper-c2", "model=bloom-176b", "workload=s512-n100-b32",
                    f"results={tmp_path}", f"out={tmp_path / 'p.json'}")
    line = one_message(err)
    assert code == 1 and not (tmp_path / "p.json").exists()
    assert "model bloom-176b with 70 layers needs" in line and "cluster paper-c2 has" in line
    assert "add devices or memory" in line


def test_memory_message_names_the_model_and_small_caps_in_mib(tmp_path, capsys):
    """opt-13b (family opt) on the local CPU devices, capped at about 2 MiB: the model's name, and the room in a unit
    that fits (not '0 GiB')."""
    code, err = run(capsys, "solve", "model=opt-13b", "cluster=local-cpu", "workload=s64-n16-b8", "solver=pipeedge",
                    f"results={tmp_path}", f"out={tmp_path / 'p.json'}")
    line = one_message(err)
    assert code == 1 and "model opt-13b with 40 layers" in line
    assert " 0 GiB" not in line and re.search(r"cluster local-cpu has .* \([\d.]+ MiB less", line), line


def test_budget_infeasible(tmp_path, capsys):
    code, err = run(capsys, "solve", *C4, "solver.max_omega=0.001", f"results={tmp_path}",
                    f"out={tmp_path / 'p.json'}")
    line = one_message(err)
    assert code == 1 and "no plan meets the quality budget Σω ≤ 0.001 (max_omega)" in line
    assert "the smallest Σω that fits memory is" in line and "raise the budget" in line


def test_missing_sensitivity_table(tmp_path, capsys):
    code, err = run(capsys, "solve", *C4, "indicator=kl", f"results={tmp_path}", f"out={tmp_path / 'p.json'}")
    line = one_message(err)
    assert code == 1 and "no sensitivity table for indicator 'kl'" in line and "llmpq calibrate" in line


def test_budget_needing_a_ppl_map(tmp_path, capsys):
    code, err = run(capsys, "solve", *C4, "solver.max_ppl_increase=1", f"results={tmp_path}",
                    f"out={tmp_path / 'p.json'}")
    line = one_message(err)
    assert code == 1 and "needs the model's ppl_map" in line and "llmpq calibrate" in line


def test_no_candidate_plan(tmp_path, capsys, monkeypatch):
    """Should the exact cost model reject every candidate, the user gets one line, not a RuntimeError."""
    monkeypatch.setattr(planner, "_best", lambda scored, budget: None)
    code, err = run(capsys, "solve", *C4, f"results={tmp_path}", f"out={tmp_path / 'p.json'}")
    line = one_message(err)
    assert code == 1 and "candidate plans fits memory and the budget under the exact cost model" in line
    assert "reserve_gib" in line


def test_unknown_plan_path(tmp_path, capsys):
    code, err = run(capsys, "explain", f"plan={tmp_path / 'none.json'}")
    line = one_message(err)
    assert code == 1 and "none.json: no such plan (run `llmpq solve`)" in line


def test_malformed_plan_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1')
    code, err = run(capsys, "explain", f"plan={bad}")
    assert code == 1 and "bad.json: not JSON" in one_message(err)
    bad.write_text('{"schema_version": 1, "method": "llmpq"}')
    code, err = run(capsys, "explain", f"plan={bad}")
    assert code == 1 and "missing key 'model'" in one_message(err)


def test_infeasible_record_is_a_plan_artifact(tmp_path, capsys):
    """paper-c4's uniform baseline cannot fit: recorded (exit 0) with needed vs available memory per device."""
    out = tmp_path / "uniform.json"
    code, err = run(capsys, "solve", *C4, "solver=uniform", f"results={tmp_path}", f"out={out}")
    assert code == 1 and "uniform: an even split of the 48 layers" in one_message(err) and not out.exists()
    assert main(["solve", *C4, "solver=uniform", f"results={tmp_path}", f"out={out}", "infeasible=record"]) == 0
    data = json.loads(out.read_text())
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    assert data["solver"] == {"status": "infeasible"} and data["stages"] == []
    info = data["infeasible"]
    assert info["kind"] == "memory" and [d["layers_needed"] for d in info["devices"]] == [12, 12, 12, 12]
    over = [d for d in info["devices"] if d["needed_bytes"] > d["capacity_bytes"]]
    assert over and all(d["needed_bytes"] == d["fixed_bytes"] + 12 * d["layer_bytes"] for d in info["devices"])
    record = read_any_plan(out)
    assert isinstance(record, InfeasiblePlan) and record.to_json() == out.read_text()
    with pytest.raises(InfeasiblePlanError, match="uniform has no plan: memory infeasible"):
        read_plan(out)
    assert (tmp_path / "uniform.parquet").is_file() and (tmp_path / "uniform.meta.json").is_file()
    code, err = run(capsys, "explain", f"plan={out}")
    assert code == 1 and "uniform has no plan" in one_message(err)


def test_schema_refuses_a_feasible_plan_without_stages_or_an_infeasible_one_with_them(tmp_path, capsys):
    out = tmp_path / "uniform.json"
    assert main(["solve", *C4, "solver=uniform", f"results={tmp_path}", f"out={out}", "infeasible=record"]) == 0
    schema = json.loads(SCHEMA.read_text())
    data = json.loads(out.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**data, "solver": {"status": "optimal"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**data, "stages": [{"device": "t4"}]}, schema)


def test_deploy_skips_an_infeasible_method(tmp_path, capsys):
    plan = tmp_path / "uniform.json"
    assert main(["solve", *C4, "solver=uniform", f"results={tmp_path}", f"out={plan}", "infeasible=record"]) == 0
    runs = tmp_path / "runs.parquet"
    assert main(["deploy", *C4, "solver=uniform", f"plan={plan}", f"out={runs}", f"results={tmp_path}"]) == 0
    assert "skipped uniform: no plan (memory infeasible)" in capsys.readouterr().out
    assert read_table("runs", runs).num_rows == 0 and "memory infeasible" in read_meta(runs)["skipped"]


def test_generate_skips_an_infeasible_method(tmp_path, capsys):
    plan = tmp_path / "uniform.json"
    assert main(["solve", *C4, "solver=uniform", f"results={tmp_path}", f"out={plan}", "infeasible=record"]) == 0
    out = tmp_path / "uniform.jsonl"
    assert main(["generate", *C4, "solver=uniform", f"plan={plan}", f"out={out}", f"results={tmp_path}"]) == 0
    assert "skipped uniform" in capsys.readouterr().out
    assert out.read_text() == "" and read_table("generate_runs", out.with_suffix(".runs.parquet")).num_rows == 0
