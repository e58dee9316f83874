"""The batch job in the workflow: rule generate writes the completions, evaluate compares their throughput,
and a changed prompts file reruns solve and everything after it (and nothing before)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from workflow_support import CLUSTER, ROOT, planned_jobs, snakemake

from llmpq.artifacts import read_table

pytestmark = pytest.mark.slow
WORKLOAD = "example-prompts"


@pytest.fixture(scope="module")
def batch_workflow(finished_workflow, tmp_path_factory):
    """The finished workflow copied, with the example prompts experiment added and run."""
    workdir = tmp_path_factory.mktemp("batch-workflow") / "w"
    shutil.copytree(finished_workflow, workdir, symlinks=True)
    shutil.copytree(ROOT / "examples", workdir / "examples")
    config_file = workdir / "conf" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["experiments"].append({"model": "tiny-opt", "cluster": CLUSTER, "workload": WORKLOAD, "solvers": ["uniform"]})
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, "--cores", "2")
    return workdir


def test_generate_writes_completions_and_evaluate_compares_them(batch_workflow):
    results = batch_workflow / "results"
    out = results / "outputs" / "tiny-opt" / CLUSTER / WORKLOAD / "uniform.jsonl"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [json.loads(line)["id"] for line in (batch_workflow / "examples" / "prompts.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ids
    runs = read_table("generate_runs", out.with_suffix(".runs.parquet")).to_pylist()
    assert runs[0]["prompts"] == len(ids) and runs[0]["tokens_per_s"] > 0
    row = read_table("eval", results / "eval" / "tiny-opt" / CLUSTER / f"{WORKLOAD}.parquet").to_pylist()[0]
    assert row["generate_tok_s"] == pytest.approx(runs[0]["tokens_per_s"])
    summary = (results / "eval" / "tiny-opt" / CLUSTER / WORKLOAD / "summary.md").read_text()
    assert "Batch job on the prompts file" in summary
    assert planned_jobs(batch_workflow) == {}


def test_changed_prompts_file_reruns_solve_and_after(batch_workflow):
    prompts = batch_workflow / "examples" / "prompts.jsonl"
    original = prompts.read_text()
    prompts.write_text(original + json.dumps({"id": "extra", "prompt": "Alas, poor Yorick!"}) + "\n")
    try:
        jobs = planned_jobs(batch_workflow)
    finally:
        prompts.write_text(original)
    assert jobs == {"solve": 1, "deploy": 1, "generate": 1, "evaluate": 1, "summary": 1, "all": 1}
