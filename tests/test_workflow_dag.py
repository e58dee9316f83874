"""The Snakemake DAG resolves for the default config and for plan-only mode (dry runs, no work done)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
    assert "constraint=v100-32g" in out        # the V100's memory size, as a node feature
    assert "slurm_partition" not in out        # no device names one, LLMPQ_SLURM_PARTITION unset: SLURM's default


PAPER_3GPU = """name: paper-3gpu
nodes:
  - {name: n0, devices: {t4: 2}}
  - {name: n1, devices: {v100-32g: 1}}
  - {name: n2, devices: {a100-80g: 1}}
present: false
links:
  intra_node: {bandwidth_gbps: 16, latency_us: 10}
  inter_node: {bandwidth_gbps: 1.25, latency_us: 50}
"""


def site_device(site: Path, stem: str, slurm: str) -> None:
    """A site's device file (the shipped one with its own `slurm:` block), as the README says to write it."""
    text = (ROOT / "conf" / "device" / f"{stem}.yaml").read_text()
    (site / "device").mkdir(parents=True, exist_ok=True)
    (site / "device" / f"{stem}.yaml").write_text(
        "\n".join(f"slurm: {slurm}" if line.startswith("slurm:") else line for line in text.splitlines()) + "\n")


@pytest.mark.slow
def test_slurm_dry_run_shows_one_heterogeneous_deploy_job_per_plan(empty_workdir, tiny_opt_dir):
    """A paper-style cluster of three GPU types (a site names two partitions): the uniform plan's deploy is one
    heterogeneous job, one component per type and node, each with its partition, constraint and GPU count."""
    site = empty_workdir / "site"
    (site / "cluster").mkdir(parents=True)
    (site / "cluster" / "paper-3gpu.yaml").write_text(PAPER_3GPU)
    site_device(site, "t4", "{gpu_model: tesla_t4, partition: gpu-t4}")
    site_device(site, "v100-32g", "{gpu_model: v100, memory_constraint: v100-32g, partition: volta}")
    shutil.copytree(tiny_opt_dir, empty_workdir / "results" / "models" / "tiny-opt")
    plan = empty_workdir / "results" / "plans" / "tiny-opt" / "paper-3gpu" / "s64-n16-b8" / "uniform.json"
    solve = subprocess.run([sys.executable, "-m", "llmpq.cli", "solve", "--config-dir", str(site), "model=tiny-opt",
                            "cluster=paper-3gpu", "solver=uniform", f"out={plan}"], cwd=empty_workdir,
                           capture_output=True, text=True, timeout=300)
    assert solve.returncode == 0, solve.stderr[-2000:]
    out = snakemake(empty_workdir, "-n", "--profile", str(ROOT / "profiles/slurm"), "--config", f"config_dir={site}",
                    "experiments=[{model: tiny-opt, cluster: paper-3gpu, workload: s64-n16-b8, solvers: [uniform]}]",
                    "--", str(plan.relative_to(empty_workdir)).replace("plans", "runs").replace(".json", ".parquet"),
                    timeout=300)
    jobs = re.findall(r"slurm_job=(.*)", out)
    assert len(jobs) == 1, out[-3000:]
    head, *components = jobs[0].split("; ")
    assert head.startswith("heterogeneous job of 3 components, 4 tasks, --time=")
    assert re.fullmatch(r"\[0\] stages 0,1 t4@n0 -p gpu-t4 -n2 -c1 --mem=\d+M --gres=gpu:tesla_t4:2", components[0])
    assert re.fullmatch(r"\[1\] stages 2 v100-32g@n1 -p volta -n1 -c1 --mem=\d+M --gres=gpu:v100:1 -C v100-32g",
                        components[1])
    assert re.fullmatch(r"\[2\] stages 3 a100-80g@n2 -n1 -c1 --mem=\d+M --gres=gpu:a100:1 -C a100-80g",
                        components[2])


@pytest.mark.slow
def test_real_experiment_set_dag_and_resources(empty_workdir):
    """`--config experiments=real`: SmolLM2 is imported, quantized at every bit-width and run with every method;
    the heavy rules ask SLURM for memory and time computed from its shape (before the import, from hf_config)."""
    from llmpq.config import compose_experiment
    from llmpq.models.resources import quantize_resources
    from llmpq.models.source import model_shape

    counts = planned_jobs(empty_workdir, "--config", "experiments=real")
    assert counts["import_model"] == 1 and "tiny_model" not in counts
    assert counts["profile"] == 2 and counts["quantize"] == 5
    assert counts["solve"] == counts["deploy"] == 5 and counts["evaluate"] == 1
    out = snakemake(empty_workdir, "-n", "--profile", str(ROOT / "profiles/slurm"), "--config", "experiments=real",
                    timeout=300)
    shape = model_shape(compose_experiment(["model=smollm2-135m"]).model)
    expected = quantize_resources(shape, 32, 128)
    quantize = re.findall(r"rule quantize:\n(?:.*\n)*?\s+resources: (.*)", out)
    assert len(quantize) == 5
    for line in quantize:
        assert f"mem_mb={expected.mem_mb}," in line and f"runtime={expected.runtime}," in line and "gpu=0" in line
    assert re.search(r"rule import_model:\n(?:.*\n)*?\s+resources: .*?mem_mb=\d+", out)
    missing = snakemake(empty_workdir, "-n", "--config", "experiments=nope", check=False)
    assert "experiments=nope: no such set under experiment_sets" in missing and "known: real" in missing
