"""The Snakemake DAG resolves for the default config and for plan-only mode (dry runs, no work done)."""

import json
import re
import shutil

import pytest
from workflow_support import ROOT, planned_jobs, snakemake


@pytest.fixture
def empty_workdir(tmp_path):
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    return tmp_path


@pytest.mark.slow
def test_default_dag(empty_workdir):
    counts = planned_jobs(empty_workdir)
    assert counts["tiny_model"] == 1
    assert counts["profile"] == 2                 # cpu-large and cpu-small
    assert counts["quantize"] == 5                # bits 16, 8, 4, 3, 2
    assert counts["solve"] == counts["deploy"] == 7 + 2   # s64-n16-b8 x 7 methods (2 llmpq-vs-*), example-prompts x 2
    assert counts["generate"] == 2                # the batch job on examples/prompts.jsonl, per method
    assert counts["evaluate"] == 2


@pytest.mark.slow
def test_plan_only_dag_has_no_weights_work(empty_workdir):
    counts = planned_jobs(empty_workdir, "plan_only")
    assert counts["solve"] == 5 * 14              # 14 (cluster, workload) cases of the paper x 5 methods
    assert "quantize" not in counts and "profile" not in counts and "deploy" not in counts


@pytest.mark.slow
def test_plan_only_records_infeasible_methods_and_goes_on(empty_workdir):
    """paper-c4's uniform baseline cannot fit: its plan records why, and the other methods' plans are made."""
    relative = "results/plans/opt-30b/paper-c4/s512-n100-b32"
    plans = empty_workdir / relative
    snakemake(empty_workdir, "--cores", "2", *(f"{relative}/{s}.json" for s in ("uniform", "pipeedge", "llmpq")),
              timeout=600)
    uniform = json.loads((plans / "uniform.json").read_text())
    assert uniform["solver"]["status"] == "infeasible" and uniform["infeasible"]["kind"] == "memory"
    assert uniform["stages"] == [] and uniform["infeasible"]["devices"]
    for method in ("pipeedge", "llmpq"):
        assert json.loads((plans / f"{method}.json").read_text())["stages"]


@pytest.mark.slow
def test_slurm_profile_requests_gpus_of_each_device_type(empty_workdir):
    """A site that owns paper-c3's GPUs: the SLURM dry run asks for a T4 and a V100 profile job."""
    site = empty_workdir / "site" / "cluster"
    site.mkdir(parents=True)
    text = (ROOT / "conf/cluster/paper-c3.yaml").read_text()
    (site / "site-c3.yaml").write_text(text.replace("present: false", "present: true").replace("name: paper-c3", "name: site-c3"))
    out = snakemake(empty_workdir, "-n", "--profile", str(ROOT / "profiles/slurm"), "--config", f"config_dir={site.parent}",
                  "experiments=[{model: opt-30b, cluster: site-c3, workload: s512-n100-b32, solvers: [llmpq]}]",
                  timeout=300)
    requests = re.findall(r"rule profile:\n(?:.*\n)*?\s+resources: .*?gpu=(\d+), gpu_model=(\w+)", out)
    assert sorted(requests) == [("1", "t4"), ("1", "v100")]
    assert "slurm_partition=local" in out
