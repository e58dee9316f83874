"""The tiny-opt workflow through `snakemake --profile profiles/slurm` on the live local SLURM cluster.

Every job goes through sbatch (the executor plugin), deploy starts its stages with srun, and the
deterministic artifacts equal those of the local run of the same config (`finished_workflow`): the
quantized layer files (sha256 in the manifests), the sensitivity table, and the plans given the same
profiles (the local run's profiles are copied in, since timings differ by nature).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from workflow_support import CLUSTER, ROOT, SOLVERS, WORKLOAD, make_workdir, snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    proc = subprocess.run(["sacct", "-X", "--parsable2", "--noheader", "--format=JobIdRaw,State", "-j",
                           ",".join(job_ids)], capture_output=True, text=True, timeout=60, check=True)
    return dict(line.split("|")[:2] for line in proc.stdout.splitlines() if "|" in line)


def wait_for_accounting(job_ids: list[str], timeout_s: float = 60) -> dict[str, str]:
    """sacct may lag a few seconds behind the jobs' end."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = sacct_states(job_ids)
        if set(states) >= set(job_ids) and all(s != "RUNNING" for s in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(2)


@pytest.fixture(scope="module")
def slurm_workflow(slurm_cluster, finished_workflow, tmp_path_factory, tiny_opt_dir):
    workdir = make_workdir(tmp_path_factory.mktemp("slurm-workflow"), tiny_opt_dir)
    shutil.copytree(finished_workflow / "results" / "profiles", workdir / "results" / "profiles")
    out = snakemake(workdir, "--profile", str(ROOT / "profiles" / "slurm"), "--retries", "0", timeout=2400)
    return workdir, out


def test_every_job_went_through_sbatch_and_completed(slurm_workflow):
    _, out = slurm_workflow
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", out)
    rules = [r for r in re.findall(r"\(Rule: (\w+)\)", out) if r != "all"]  # `all` is a local rule
    assert {"quantize", "calibrate", "ppl_map", "solve", "deploy", "evaluate"} <= set(rules), out[-3000:]
    assert len(set(job_ids)) == len(rules), out[-3000:]
    states = wait_for_accounting(sorted(set(job_ids)))
    assert set(states.values()) == {"COMPLETED"}, states


def test_results_equal_the_local_run(slurm_workflow, finished_workflow):
    workdir, _ = slurm_workflow
    local, remote = finished_workflow / "results", workdir / "results"
    for manifest in sorted((local / "quantized" / "tiny-opt").glob("*/manifest.parquet")):
        mine = pq.read_table(remote / manifest.relative_to(local)).column("sha256").to_pylist()
        assert mine == pq.read_table(manifest).column("sha256").to_pylist(), manifest.parent.name
    sensitivity = Path("sensitivity") / "tiny-opt.parquet"
    assert pq.read_table(remote / sensitivity).equals(pq.read_table(local / sensitivity))
    for solver in SOLVERS:
        plan = Path("plans") / "tiny-opt" / CLUSTER / WORKLOAD / f"{solver}.json"
        assert json.loads((remote / plan).read_text()) == json.loads((local / plan).read_text()), solver
        assert (remote / "runs" / "tiny-opt" / CLUSTER / WORKLOAD / f"{solver}.parquet").is_file()
