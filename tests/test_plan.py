"""Plan JSON: canonical form, round trip, validation, the JSON schema, artifacts and the CLI verbs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from llmpq.artifacts import read_table
from llmpq.cli import main
from llmpq.solve.explain import bits_runs, explain
from llmpq.solve.plan import (Plan, PlanError, StageMemoryPlan, StagePlan, layer_rows, layers_path,
                              meta_path, read_plan, to_dict, to_json)
from llmpq.solve.run import write_plan

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "plan.schema.json"


def memory(weights: int = 10) -> StageMemoryPlan:
    return StageMemoryPlan(weights, 5, 3, 2, 1, 1, 7, 1000)


def plan(**overrides) -> Plan:
    stages = (StagePlan("t4", "n0", 0, 2, (8, 4), memory(), 12.3456789012345, 0.1),
              StagePlan("v100-32g", "n1", 2, 5, (16, 16, 3), memory(20), 7.0, 0.2 / 3))
    base = Plan(method="llmpq", model="opt-30b", cluster="paper-c3", workload="s512-n100-b32", quant_scheme="gptq",
                quant_group_size=128, micro_batch_prefill=1, micro_batch_decode=4, stages=stages, prefill_s=1.0 / 3,
                decode_s=2.5, throughput_tok_s=1234.56789123456, bottleneck_stage=0, omega=0.125, ppl_increase=None,
                budget=0.25, latency_source="roofline", omega_source="proxy", status="optimal",
                objective=2833.3333333333, gap=1e-5, plan_source="milp")
    return replace(base, **overrides)


def test_canonical_json_is_sorted_and_rounded():
    text = to_json(plan())
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert data["predicted"]["throughput_tok_s"] == 1234.56789
    assert data["stages"][0]["predicted"]["prefill_ms"] == 12.3456789
    assert data["stages"][0]["layers"] == [0, 2]
    assert set(data) == {"schema_version", "method", "model", "cluster", "workload", "quant", "micro_batch",
                         "stages", "predicted", "quality", "sources", "solver"}
    assert "host" not in text and "solve_s" not in text


def test_round_trip_and_schema(tmp_path):
    p = plan()
    path = tmp_path / "plan.json"
    path.write_text(to_json(p))
    back = read_plan(path)
    assert to_json(back) == to_json(p)
    assert back.bits == (8, 4, 16, 16, 3) and back.num_layers == 5
    jsonschema.validate(json.loads(to_json(p)), json.loads(SCHEMA.read_text()))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["stages"][1].update(layers=[3, 5]), "does not continue the pipeline at layer 2"),
    (lambda d: d["stages"][0].update(bits=[8]), "expected 2 positive integers"),
    (lambda d: d["solver"].update(status="done"), "is not one of optimal"),
    (lambda d: d["solver"].update(plan_source="magic"), "plan_source"),
    (lambda d: d["sources"].update(latency="guess"), "sources.latency"),
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d["micro_batch"].update(decode=0), "must be >= 1"),
    (lambda d: d["stages"][0]["memory"].pop("kv_bytes"), "missing key 'kv_bytes'"),
    (lambda d: d["predicted"].update(bottleneck_stage=5), "bottleneck_stage"),
    (lambda d: d.pop("quality"), "missing key 'quality'"),
])
def test_invalid_plans_are_refused_with_the_key_at_fault(tmp_path, edit, message):
    data = to_dict(plan())
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message) as err:
        read_plan(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("edit", [
    lambda d: d["solver"].update(status="done"),
    lambda d: d["solver"].update(plan_source="magic"),
    lambda d: d["sources"].update(omega="guess"),
    lambda d: d["stages"][0]["memory"].pop("kv_bytes"),
    lambda d: d.update(extra=1),
])
def test_schema_refuses_structural_errors(edit):
    data = to_dict(plan())
    edit(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, json.loads(SCHEMA.read_text()))


def test_missing_plan_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such plan"):
        read_plan(tmp_path / "none.json")


def test_write_plan_writes_json_layers_and_sidecar(tmp_path):
    out = tmp_path / "plans" / "llmpq.json"
    write_plan(plan(), out, {"solve_s": 1.5, "milps": 3}, "abc")
    assert to_json(read_plan(out)) == to_json(plan())
    side = json.loads(meta_path(out).read_text())
    assert side["solve_s"] == 1.5 and "host" in side and side["config_hash"] == "abc"
    rows = read_table("plan_layers", layers_path(out)).to_pylist()
    assert rows == layer_rows(plan())
    assert [r["bits"] for r in rows] == [8, 4, 16, 16, 3] and [r["stage"] for r in rows] == [0, 0, 1, 1, 1]


def test_explain_names_the_bottleneck():
    text = explain(plan())
    assert "bottleneck: stage 0 (t4 on n0)" in text
    assert "<- bottleneck" in text.splitlines()[3]
    assert bits_runs((8, 8, 8, 4)) == "8x3 4"


def test_cli_solve_and_explain(tmp_path, capsys):
    out = tmp_path / "c3.json"
    args = ["model=opt-30b", "cluster=paper-c3", "workload=s512-n100-b32", "solver=pipeedge",
            f"results={tmp_path / 'results'}"]
    assert main(["solve", *args, f"out={out}"]) == 0
    first = out.read_bytes()
    assert main(["solve", *args, f"out={out}"]) == 0
    assert out.read_bytes() == first
    assert layers_path(out).is_file() and meta_path(out).is_file()
    assert main(["explain", *args, f"plan={out}"]) == 0
    shown = capsys.readouterr().out
    assert "<- bottleneck" in shown and "pipeedge" in shown


def test_cli_solve_reports_infeasible_memory(tmp_path, capsys):
    code = main(["solve", "model=bloom-176b", "cluster=paper-c1", "workload=s512-n100-b32", "solver=uniform",
                 f"results={tmp_path}", f"out={tmp_path / 'x.json'}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "needs" in err and "GiB at the lowest bits" in err and "cluster paper-c1 has" in err
    assert not (tmp_path / "x.json").exists()
