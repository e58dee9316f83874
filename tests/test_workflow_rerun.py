"""Incremental reruns: after a finished workflow, each config change reruns exactly the jobs that depend on it.

One real run of the workflow (tiny-opt on a one-device CPU cluster, two methods, a small profile grid) in a
temporary working directory; then each test edits one config file, asks Snakemake what it would rerun
(`snakemake -n`, which compares the recorded params and input checksums, not only mtimes) and restores
the file. The same finished run is the local reference of the SLURM test.
"""

from __future__ import annotations

import re

import pytest
import yaml
from workflow_support import CLUSTER, SOLVERS, WORKLOAD, edited, planned_jobs, snakemake

pytestmark = pytest.mark.slow


def test_finished_workflow_has_every_artifact(finished_workflow):
    results = finished_workflow / "results"
    for solver in SOLVERS:
        assert (results / "plans" / "tiny-opt" / CLUSTER / WORKLOAD / f"{solver}.json").is_file()
        assert (results / "runs" / "tiny-opt" / CLUSTER / WORKLOAD / f"{solver}.parquet").is_file()
    figures = results / "eval" / "tiny-opt" / CLUSTER / WORKLOAD
    assert (figures.with_suffix(".parquet")).is_file()
    assert {"plan.png", "throughput.png", "fidelity.png", "quality.png", "summary.md"} <= {p.name for p in figures.iterdir()}
    assert not (finished_workflow / "logs" / "tiny_model.log").exists(), "the workflow tests trained tiny-opt again"


def test_long_jobs_show_progress_in_the_snakemake_console(finished_workflow):
    """Each long job writes start, periodic and end lines where Snakemake prints (not only into its log)."""
    console = (finished_workflow / "console.txt").read_text()
    for start in ("llmpq quantize tiny-opt gptq-w4: 0/4 layers", "llmpq calibrate tiny-opt", "llmpq profile tiny-opt on",
                  "llmpq deploy llmpq (tiny-opt on", "llmpq evaluate tiny-opt on"):
        assert start in console, start
    assert re.search(r"llmpq quantize tiny-opt gptq-w4: done, 4 layers in \d+:\d\d:\d\d", console)
    log = (finished_workflow / "logs" / "quantize" / "tiny-opt" / "gptq-w4.log").read_text()
    assert "llmpq quantize" not in log  # the console lines are not in the log (its tqdm bar is)


def test_noop_rerun_runs_nothing(finished_workflow):
    assert planned_jobs(finished_workflow) == {}


def test_adding_a_device_type_reruns_its_profile_and_the_cluster_downstream(finished_workflow):
    def add_device(data):
        data["nodes"][0]["devices"]["cpu-small"] = 1

    with edited(finished_workflow / "conf" / "cluster" / f"{CLUSTER}.yaml", add_device):
        jobs = planned_jobs(finished_workflow)
    n = len(SOLVERS)
    assert jobs == {"profile": 1, "profile_links": 1, "solve": n, "deploy": n, "evaluate": 1, "summary": 1, "all": 1}


def test_changing_the_workload_reruns_solve_and_after(finished_workflow):
    def shorter(data):
        data["gen_len"] = data["gen_len"] // 2

    with edited(finished_workflow / "conf" / "workload" / f"{WORKLOAD}.yaml", shorter):
        jobs = planned_jobs(finished_workflow)
    n = len(SOLVERS)
    assert jobs == {"solve": n, "deploy": n, "evaluate": 1, "summary": 1, "all": 1}


def test_changing_the_quality_budget_reruns_that_method_only(finished_workflow):
    def budget(data):
        data["max_ppl_increase"] = 5.0

    with edited(finished_workflow / "conf" / "solver" / "llmpq.yaml", budget):
        jobs = planned_jobs(finished_workflow)
    assert jobs == {"solve": 1, "deploy": 1, "evaluate": 1, "summary": 1, "all": 1}


def test_changing_calibration_text_reruns_quantize_and_calibrate(finished_workflow):
    config_file = finished_workflow / "conf" / "config.yaml"

    def fewer_samples(data):
        data["calibration"]["samples"] = data["calibration"]["samples"] // 2

    with edited(config_file, fewer_samples):
        jobs = planned_jobs(finished_workflow)
    n = len(SOLVERS)
    assert jobs == {"quantize": 5, "calibrate": 1, "ppl_map": 1, "solve": n, "deploy": n, "evaluate": 1, "summary": 1, "all": 1}


def test_an_empty_config_dir_reruns_nothing(finished_workflow, tmp_path):
    """The config dir's path is in no rule's command line: pointing at one changes nothing by itself."""
    assert planned_jobs(finished_workflow, "--config", f"config_dir={tmp_path}") == {}


def test_a_config_dir_device_override_reruns_that_device_downstream(finished_workflow, tmp_path):
    """A site's own device file (a tighter memory cap) wins over the shipped one: plans and runs rerun, the
    profile does not (a CPU device's cap is a planning limit, not part of its timings)."""
    shipped = yaml.safe_load((finished_workflow / "conf" / "device" / "cpu.yaml").read_text())
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "cpu.yaml").write_text(yaml.safe_dump({**shipped, "memory_gib": 2.0, "memory_cap_gib": 2.0}))
    jobs = planned_jobs(finished_workflow, "--config", f"config_dir={tmp_path}")
    n = len(SOLVERS)
    assert jobs == {"solve": n, "deploy": n, "evaluate": 1, "summary": 1, "all": 1}


def test_a_config_error_exits_2_through_snakemake(finished_workflow, tmp_path):
    shipped = yaml.safe_load((finished_workflow / "conf" / "device" / "cpu.yaml").read_text())
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "cpu.yaml").write_text(yaml.safe_dump({**shipped, "reserve_gb": 3}))
    out = snakemake(finished_workflow, "-n", "--config", f"config_dir={tmp_path}", check=False, returncode=True)
    assert out.returncode == 2, out.text[-2000:]
    assert "reserve_gb: unknown key; did you mean `reserve_gib`?" in out.text
    assert f"{tmp_path}/device/cpu.yaml" in out.text  # the file the key is in, even when inherited
    assert "Traceback" not in out.text


def test_report_first_page_shows_the_result(finished_workflow):
    """The Snakemake report opens on the workflow description, which embeds the summary: table, paragraph, plan."""
    snakemake(finished_workflow, "--cores", "2", "--report", "report.html")
    page = (finished_workflow / "report.html").read_text()
    assert "measured tok/s" in page and "is the fastest here" in page and "data:image/png;base64" in page
    summary = (finished_workflow / "results" / "summary.html").read_text()
    assert summary.count("<tr>") == 1 + len(SOLVERS)
