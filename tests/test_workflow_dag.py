"""The Snakemake DAG resolves for the default config and for plan-only mode (dry runs, no work done)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def dry_run(*args, cwd=ROOT):
    proc = subprocess.run(SNAKEMAKE + ["-n", "--directory", str(cwd), "-s", str(ROOT / "Snakefile"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def job_counts(text):
    block = text[text.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


@pytest.fixture
def empty_workdir(tmp_path):
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    return tmp_path


@pytest.mark.slow
def test_default_dag(empty_workdir):
    counts = job_counts(dry_run(cwd=empty_workdir))
    assert counts["tiny_model"] == 1
    assert counts["profile"] == 2                 # cpu-large and cpu-small
    assert counts["quantize"] == 5                # bits 16, 8, 4, 3, 2
    assert counts["solve"] == counts["deploy"] == 4
    assert counts["evaluate"] == 1


@pytest.mark.slow
def test_plan_only_dag_has_no_weights_work(empty_workdir):
    counts = job_counts(dry_run("plan_only", cwd=empty_workdir))
    assert counts["solve"] == 4 * 14              # 14 (cluster, workload) cases of the paper x 4 methods
    assert "quantize" not in counts and "profile" not in counts and "deploy" not in counts


@pytest.mark.slow
def test_slurm_profile_requests_gpus_of_each_device_type(empty_workdir):
    """A site that owns paper-c3's GPUs: the SLURM dry run asks for a T4 and a V100 profile job."""
    site = empty_workdir / "site" / "cluster"
    site.mkdir(parents=True)
    text = (ROOT / "conf/cluster/paper-c3.yaml").read_text()
    (site / "site-c3.yaml").write_text(text.replace("present: false", "present: true").replace("name: paper-c3", "name: site-c3"))
    out = dry_run("--profile", str(ROOT / "profiles/slurm"), "--config", f"config_dir={site.parent}",
                  "experiments=[{model: opt-30b, cluster: site-c3, workload: s512-n100-b32, solvers: [llmpq]}]",
                  cwd=empty_workdir)
    requests = re.findall(r"rule profile:\n(?:.*\n)*?\s+resources: .*?gpu=(\d+), gpu_model=(\w+)", out)
    assert sorted(requests) == [("1", "t4"), ("1", "v100")]
    assert "slurm_partition=local" in out
