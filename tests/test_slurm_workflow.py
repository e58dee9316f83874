"""The tiny-opt workflow through `snakemake --profile slurm` on the live local SLURM cluster, for a two-stage plan
over two device types on two nodes (`local-2node`: cpu-typea in partition local with fake GPU type typea,
cpu-typeb in partition local2 with typeb).

The profile is installed the documented way (`llmpq slurm-profile install`, into a temporary XDG config dir).
Every rule but deploy goes through sbatch by the executor plugin; each deploy is one heterogeneous job of its
own (a component per device type and node, one srun); the profile jobs of the two device types ask for their
GPU type and partition. The deterministic artifacts equal those of the local run of the same config
(`finished_workflow`: quantized layer files, sensitivity), the plans equal a local solve of the same inputs
(timings differ by nature), and each run's tokens equal a local torchrun run of the same plan. A stage that fails fails its whole job, and the rule's log
names the failing component.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from workflow_support import SOLVERS, WORKLOAD, make_workdir, snakemake

from llmpq.runtime.report import read_sidecar

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER = "local-2node"
STAGE_DEVICES = {"cpu-typea": ("local", "typea"), "cpu-typeb": ("local2", "typeb")}   # partition, fake GPU type


def sacct(job_ids: list[str], *args: str) -> list[list[str]]:
    fields = "JobID,State,Partition,AllocTRES,Comment"
    proc = subprocess.run(["sacct", "--parsable2", "--noheader", f"--format={fields}", "-j", ",".join(job_ids),
                           *args], capture_output=True, text=True, timeout=60, check=True)
    return [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == fields.count(",")]


def wait_for_accounting(job_ids: list[str], timeout_s: float = 60) -> dict[str, list[str]]:
    """Allocation rows by job id (`N`, or `N+k` for components) once none is running (sacct lags the jobs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = {r[0]: r for r in sacct(job_ids, "-X")}
        done = {r.split("+")[0] for r in rows} >= set(job_ids)
        if done and all(r[1] not in ("RUNNING", "PENDING") for r in rows.values()) or time.monotonic() > deadline:
            return rows
        time.sleep(2)


def deploy_log(workdir: Path, solver: str) -> str:
    return (workdir / "logs" / "deploy" / "tiny-opt" / CLUSTER / WORKLOAD / f"{solver}.log").read_text()


def deploy_job_id(log: str) -> str:
    line = next(line for line in log.splitlines() if line.startswith("llmpq slurm: submitted batch job"))
    return line.split()[5].rstrip(";")


def results_path(workdir: Path, kind: str, solver: str, suffix: str) -> Path:
    return workdir / "results" / kind / "tiny-opt" / CLUSTER / WORKLOAD / f"{solver}{suffix}"


def slurm_nodes() -> dict[str, str]:
    """Node of each partition of the local cluster."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P %N"], capture_output=True, text=True, check=True).stdout
    return {p.rstrip("*"): n for p, n in (line.split() for line in out.splitlines())}


@pytest.fixture(scope="module")
def profile_env(tmp_path_factory) -> dict[str, str]:
    """The documented install step, into a temporary config dir: `snakemake --profile slurm` then finds it."""
    env = {"XDG_CONFIG_HOME": str(tmp_path_factory.mktemp("xdg"))}
    proc = subprocess.run([sys.executable, "-m", "llmpq.cli", "slurm-profile", "install"], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 0 and "snakemake --profile slurm" in proc.stdout, proc.stderr
    return env


@pytest.fixture(scope="module")
def slurm_workflow(slurm_cluster, profile_env, tmp_path_factory, tiny_opt_dir):
    workdir = make_workdir(tmp_path_factory.mktemp("slurm-workflow"), tiny_opt_dir)
    config_file = workdir / "conf" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["experiments"] = [{"model": "tiny-opt", "cluster": CLUSTER, "workload": WORKLOAD, "solvers": SOLVERS}]
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    out = snakemake(workdir, "--profile", "slurm", env=profile_env, timeout=2400)
    return workdir, out


def test_every_plugin_job_went_through_sbatch_and_completed(slurm_workflow):
    _, out = slurm_workflow
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", out)
    rules = [r for r in re.findall(r"\(Rule: (\w+)\)", out) if r not in ("all", "deploy")]  # local rules
    assert {"quantize", "calibrate", "ppl_map", "solve", "evaluate", "profile", "profile_links"} <= set(rules), out[-3000:]
    assert len(set(job_ids)) == len(rules), out[-3000:]
    rows = wait_for_accounting(sorted(set(job_ids)))
    assert {r[1] for r in rows.values()} == {"COMPLETED"}, rows
    # the plugin cannot name jobs after rules (it finds its jobs by name), but it records rule and wildcards
    assert all(r[4].startswith("rule_") for r in rows.values()), rows
    assert any(r[4].startswith("rule_solve_wildcards_tiny-opt") for r in rows.values()), rows
    profiles = {r[4]: r for r in rows.values() if r[4].startswith("rule_profile_wildcards")}
    for stem, (partition, gpu_type) in STAGE_DEVICES.items():
        _, _, got_partition, tres, _ = profiles[f"rule_profile_wildcards_{stem}_tiny-opt"]
        assert got_partition == partition and f"gres/gpu:{gpu_type}=1" in tres, profiles


def test_each_deploy_is_one_heterogeneous_job_on_the_planned_nodes(slurm_workflow):
    workdir, _ = slurm_workflow
    nodes = slurm_nodes()
    for solver in SOLVERS:
        plan = json.loads(results_path(workdir, "plans", solver, ".json").read_text())
        devices = [s["device"] for s in plan["stages"]]
        assert sorted(devices) == ["cpu-typea", "cpu-typeb"], solver   # either order: stage k is component k
        log = deploy_log(workdir, solver)
        job = deploy_job_id(log)
        rows = wait_for_accounting([job])
        assert sorted(rows) == [f"{job}+0", f"{job}+1"], rows
        for k, device in enumerate(devices):
            partition, gpu_type = STAGE_DEVICES[device]
            _, state, got_partition, tres, _ = rows[f"{job}+{k}"]
            assert (state, got_partition) == ("COMPLETED", partition), rows
            assert f"gres/gpu:{gpu_type}=1" in tres, rows
            assert f"{k}: llmpq stage {k} ({device}): component {k} task 0 on node {nodes[partition]}" in log, log
        assert "heterogeneous job of 2 components" in log and f"ended with status 0" in log, log


def test_runs_equal_a_local_torchrun_run_of_the_same_plan(slurm_workflow, tmp_path):
    workdir, _ = slurm_workflow
    for solver in SOLVERS:
        local = tmp_path / f"{solver}.parquet"
        proc = subprocess.run([sys.executable, "-m", "llmpq.cli", "deploy", f"cluster={CLUSTER}",
                               f"workload={WORKLOAD}", "deploy.launcher=torchrun",
                               f"plan={results_path(workdir, 'plans', solver, '.json')}", f"out={local}"],
                              cwd=workdir, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        remote = read_sidecar(results_path(workdir, "runs", solver, ".parquet"))
        assert remote["tokens"] == read_sidecar(local)["tokens"], solver
        assert remote["prompts"] == read_sidecar(local)["prompts"], solver


def test_results_equal_the_local_run(slurm_workflow, finished_workflow, tmp_path):
    workdir, _ = slurm_workflow
    local, remote = finished_workflow / "results", workdir / "results"
    for manifest in sorted((local / "quantized" / "tiny-opt").glob("*/manifest.parquet")):
        mine = pq.read_table(remote / manifest.relative_to(local)).column("sha256").to_pylist()
        assert mine == pq.read_table(manifest).column("sha256").to_pylist(), manifest.parent.name
    sensitivity = Path("sensitivity") / "tiny-opt.parquet"
    assert pq.read_table(remote / sensitivity).equals(pq.read_table(local / sensitivity))
    for solver in SOLVERS:
        plan = tmp_path / f"{solver}.json"
        proc = subprocess.run([sys.executable, "-m", "llmpq.cli", "solve", f"cluster={CLUSTER}", f"workload={WORKLOAD}",
                               f"solver={solver}", f"out={plan}"], cwd=workdir, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(results_path(workdir, "plans", solver, ".json").read_text()) == json.loads(plan.read_text())


def test_a_failed_stage_fails_the_whole_job_and_the_log_names_its_component(slurm_workflow, profile_env, tmp_path):
    workdir, _ = slurm_workflow
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken, symlinks=True)
    config_file = broken / "conf" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["deploy"].update({"fault": "1:1:exit", "timeout_s": 20})
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    target = results_path(broken, "runs", "llmpq", ".parquet")
    out = snakemake(broken, "--profile", "slurm", "--retries", "0", str(target.relative_to(broken)), check=False,
                    env=profile_env, timeout=900)
    assert "Error in rule deploy" in out, out[-3000:]
    log = deploy_log(broken, "llmpq")
    assert "injected fault 'exit'" in log and "no runs table written" in log, log[-3000:]
    failing = json.loads(results_path(broken, "plans", "llmpq", ".json").read_text())["stages"][1]
    assert f"llmpq slurm: failing component 1: stages 1 ({failing['device']} on plan node {failing['node']}" in log, \
        log[-3000:]
    rows = wait_for_accounting([deploy_job_id(log)])
    assert {r[1] for r in rows.values()} <= {"FAILED", "CANCELLED"} and len(rows) == 2, rows
    assert not target.exists()
