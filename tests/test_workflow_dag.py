"""The Snakemake DAG resolves for the default config and for plan-only mode (dry runs, no work done)."""

import re
import shutil

import pytest
from workflow_support import ROOT, planned_jobs, snakemake


@pytest.fixture
def empty_workdir(tmp_path):
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    return tmp_path


@pytest.mark.slow
def test_default_dag(empty_workdir):
    counts = planned_jobs(empty_workdir)
    assert counts["tiny_model"] == 1
    assert counts["profile"] == 2                 # cpu-large and cpu-small
    assert counts["quantize"] == 5                # bits 16, 8, 4, 3, 2
    assert counts["solve"] == counts["deploy"] == 4
    assert counts["evaluate"] == 1


@pytest.mark.slow
def test_plan_only_dag_has_no_weights_work(empty_workdir):
    counts = planned_jobs(empty_workdir, "plan_only")
    assert counts["solve"] == 4 * 14              # 14 (cluster, workload) cases of the paper x 4 methods
    assert "quantize" not in counts and "profile" not in counts and "deploy" not in counts


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
