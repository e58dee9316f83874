"""A plan's SLURM job without a cluster: device slurm blocks, components, resources, the batch script, what a
task finds in its environment, how the end of a job is read, and the profile's install step."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llmpq.config import ConfigError, compose_experiment, load_device
from llmpq.config.types import SlurmBlock
from llmpq.costmodel.memory import StageMemory
from llmpq.runtime.job import StageSpec
from llmpq.runtime.stage import torch_device
from llmpq.slurm import profile_link
from llmpq.slurm.batch import srun_command
from llmpq.slurm.hetjob import plan_job
from llmpq.slurm.placement import PlannedPlace, TaskPlace, node_gres, placement_problem, task_place
from llmpq.slurm.request import DeviceRequest, constraint_expression, device_request, plugin_resources
from llmpq.slurm.resources import CPU_PROCESS_BYTES, CUDA_PROCESS_BYTES, SlurmOptions, job_minutes
from llmpq.slurm.script import batch_script, job_name
from llmpq.slurm.site import SiteSettings
from llmpq.slurm.submit import component_ends, describe_end, JobEnd
from llmpq.solve.plan import Plan, StagePlan

ROOT = Path(__file__).resolve().parents[1]
MIB, GIB = 1024**2, 1024**3


def plan_of(stages: list[tuple[str, str]], memory: StageMemory, prefill_s: float = 10.0, decode_s: float = 50.0,
            cluster: str = "paper-c3") -> Plan:
    """A plan over (device, node) stages, one layer each, with the same memory per stage."""
    return Plan(method="uniform", model="opt-30b", cluster=cluster, workload="s512-n100-b32", quant_scheme="gptq",
                quant_group_size=128, micro_batch_prefill=4, micro_batch_decode=8,
                stages=tuple(StagePlan(d, n, j, j + 1, (16,), memory, 2.0, 1.0) for j, (d, n) in enumerate(stages)),
                prefill_s=prefill_s, decode_s=decode_s, throughput_tok_s=100.0, bottleneck_stage=0, omega=0.0,
                ppl_increase=None, budget=None, latency_source="roofline", omega_source="proxy", status="feasible",
                objective=None, gap=None, plan_source="baseline")


def write_device(config_dir: Path, stem: str, slurm: str) -> Path:
    """A site's device file: the shipped one with its `slurm:` line replaced."""
    text = (ROOT / "conf" / "device" / f"{stem}.yaml").read_text()
    lines = [f"slurm: {slurm}" if line.startswith("slurm:") else line for line in text.splitlines()]
    path = config_dir / "device" / f"{stem}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ device slurm blocks


def test_shipped_devices_tell_memory_sizes_apart():
    requests = {stem: device_request(load_device(stem).slurm, SiteSettings()) for stem in
                ("v100-16g", "v100-32g", "a100-40g", "a100-80g", "t4")}
    assert requests["v100-16g"].gres == requests["v100-32g"].gres == "gpu:v100"
    assert requests["v100-16g"].constraint == "v100-16g" and requests["v100-32g"].constraint == "v100-32g"
    assert requests["a100-40g"].constraint != requests["a100-80g"].constraint
    assert requests["t4"] == DeviceRequest(gres="gpu:t4")
    assert len(set(requests.values())) == len(requests)


@pytest.mark.parametrize("slurm, key, message", [
    ("{gpu_model: v100, partiton: gpu}", "slurm.partiton", "unknown key"),
    ("{gres: 'gpu:v100:2'}", "slurm.gres", "without a count"),
    ("{gres: 'gpu:v100', gpu_model: v100}", "slurm.gres", "not both"),
    ("{partition: 3}", "slurm.partition", "expected str"),
])
def test_bad_slurm_blocks_are_refused_naming_file_and_key(tmp_path, slurm, key, message):
    path = write_device(tmp_path, "v100-16g", slurm)
    with pytest.raises(ConfigError) as err:
        load_device("v100-16g", config_dir=tmp_path)
    assert err.value.file == str(path) and err.value.key == key and message in err.value.message


def test_unknown_slurm_key_is_a_config_error_of_the_cli(tmp_path):
    path = write_device(tmp_path, "t4", "{gpu_model: t4, gpus: 2}")
    proc = subprocess.run([sys.executable, "-m", "llmpq.cli", "config", "--config-dir", str(tmp_path),
                           "cluster=paper-c3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{path}: slurm.gpus: unknown key" in proc.stderr and not proc.stdout


def test_a_site_device_file_replaces_the_shipped_one(tmp_path):
    write_device(tmp_path, "t4", "{gpu_model: tesla_t4, partition: gpu-t4}")
    exp = compose_experiment(["cluster=paper-c3"], config_dir=tmp_path)
    assert exp.devices["t4"].slurm == SlurmBlock(gpu_model="tesla_t4", partition="gpu-t4")
    assert exp.devices["v100-32g"].slurm.gpu_model == "v100"      # the shipped file where the site has none


def test_requests_and_plugin_resources():
    assert constraint_expression("ib|eth", "v100-32g") == "(ib|eth)&v100-32g"
    assert constraint_expression("ib", None) == "ib" and constraint_expression(None, None) is None
    block = SlurmBlock(gpu_model="v100", constraint="ib", memory_constraint="v100-32g")
    site = SiteSettings(account="acct", partition="gpu")
    assert device_request(block, site) == DeviceRequest("gpu:v100", "gpu", "ib&v100-32g")
    assert plugin_resources(block, site, 2) == {"gpu": 2, "gpu_model": "v100", "gres": "", "slurm_partition": "gpu",
                                                "constraint": "ib&v100-32g"}
    fake = plugin_resources(SlurmBlock(gres="gpu:typeb", partition="local2"), SiteSettings())
    assert fake == {"gpu": 0, "gpu_model": "", "gres": "gpu:typeb:1", "slurm_partition": "local2", "constraint": None}
    assert plugin_resources(SlurmBlock(), SiteSettings())["slurm_partition"] is None   # the profile's default applies
    assert SiteSettings.from_env({"LLMPQ_SLURM_ACCOUNT": "a", "LLMPQ_SLURM_PARTITION": ""}) == SiteSettings("a", None)


@pytest.mark.parametrize("env", [{}, {"LLMPQ_SLURM_ACCOUNT": "proj1", "LLMPQ_SLURM_PARTITION": "gpu"}])
def test_profile_reads_the_site_settings_like_the_library(monkeypatch, env):
    """The profile's default-resources expressions and SiteSettings read the same variables, unset alike."""
    resources = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())["default-resources"]
    for key in ("LLMPQ_SLURM_ACCOUNT", "LLMPQ_SLURM_PARTITION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    site = SiteSettings.from_env()
    assert (site.account, site.partition) == (env.get("LLMPQ_SLURM_ACCOUNT"), env.get("LLMPQ_SLURM_PARTITION"))
    assert eval(resources["slurm_account"], {}) == site.account
    assert eval(resources["slurm_partition"], {}) == site.partition


# ------------------------------------------------------------------ the job of a plan


def test_components_group_stages_by_plan_node_and_request():
    memory = StageMemory(GIB, 0, 0, 0, 0, 0, 0, 16 * GIB)
    devices = {s: load_device(s) for s in ("t4", "v100-32g", "v100-16g")}
    plan = plan_of([("t4", "n0"), ("v100-32g", "n1"), ("t4", "n0"), ("t4", "n2"), ("v100-16g", "n1")], memory)
    job = plan_job(plan, devices, "deploy.x", site=SiteSettings(account="proj"))
    assert [(c.node, c.devices, c.stages) for c in job.components] == [
        ("n0", ("t4",), (0, 2)), ("n1", ("v100-32g",), (1,)), ("n2", ("t4",), (3,)), ("n1", ("v100-16g",), (4,))]
    assert job.heterogeneous and job.tasks == 5 and job.account == "proj"
    assert job.task_stages() == (0, 2, 1, 3, 4)                  # SLURM numbers tasks component after component
    assert job.components[0].sbatch_options(30, "proj") == [
        "--account=proj", "--time=30", "--nodes=1", "--ntasks=2", "--cpus-per-task=1",
        f"--mem={2 * math.ceil((CUDA_PROCESS_BYTES + GIB) * 1.25 / MIB)}M", "--gres=gpu:t4:2"]
    assert "--constraint=v100-16g" in job.components[3].sbatch_options(30, None)


def test_stages_with_the_same_request_on_one_node_share_a_component():
    memory = StageMemory(MIB, MIB, MIB, 0, 0, 0, 0, GIB)
    devices = {s: load_device(s) for s in ("cpu-large", "cpu-small")}
    job = plan_job(plan_of([("cpu-large", "local"), ("cpu-small", "local")], memory, cluster="local-cpu"), devices,
                   "deploy.x", site=SiteSettings())
    assert not job.heterogeneous and job.components[0].devices == ("cpu-large", "cpu-small")
    assert job.components[0].request == DeviceRequest() and job.task_stages() == (0, 1)


def test_memory_and_time_from_the_plan():
    """CPU: 1.25 x (P_cpu + all planned parts); GPU: 1.25 x (P_cuda + weights + embed + head); time from the plan."""
    memory = StageMemory(weights_bytes=3 * GIB, kv_bytes=GIB, activations_bytes=256 * MIB, embed_bytes=512 * MIB,
                         head_bytes=512 * MIB, buffers_bytes=MIB, reserve_bytes=0, capacity_bytes=16 * GIB)
    cpu = plan_job(plan_of([("cpu", "local")], memory, cluster="local-cpu"), {"cpu": load_device("cpu")}, "x",
                   site=SiteSettings()).components[0]
    assert cpu.mem_mb == math.ceil((CPU_PROCESS_BYTES + memory.total_bytes) * 1.25 / MIB)
    gpu = plan_job(plan_of([("t4", "n0")], memory), {"t4": load_device("t4")}, "x", site=SiteSettings()).components[0]
    assert gpu.mem_mb == math.ceil((CUDA_PROCESS_BYTES + 4 * GIB) * 1.25 / MIB) == 7680
    options = SlurmOptions(time_margin=3.0, startup_s=300.0, load_gbps=0.5, min_minutes=5)
    # 300 s + 3 GiB / 0.5 GB/s (6.44 s) + 3 x (10 + 50) s = 486.4 s -> 9 min
    assert job_minutes(plan_of([("t4", "n0")], memory), options) == 9
    assert job_minutes(plan_of([("t4", "n0")], memory, prefill_s=0.001, decode_s=0.001), options) == 6
    assert job_minutes(plan_of([("t4", "n0")], memory, 0.0, 0.0), SlurmOptions(startup_s=1, min_minutes=5)) == 5


def test_slurm_options_refuse_unknown_and_bad_values():
    assert SlurmOptions.from_raw({"time_margin": 2, "min_minutes": 10}) == SlurmOptions(time_margin=2.0, min_minutes=10)
    with pytest.raises(ConfigError, match="slurm.margin: unknown key"):
        SlurmOptions.from_raw({"margin": 2})
    with pytest.raises(ConfigError, match="slurm.startup_s: expected a number > 0"):
        SlurmOptions.from_raw({"startup_s": 0})


def test_batch_script_has_one_sbatch_line_per_component(tmp_path):
    memory = StageMemory(GIB, 0, 0, 0, 0, 0, 0, 16 * GIB)
    devices = {s: load_device(s) for s in ("t4", "v100-32g")}
    job = plan_job(plan_of([("t4", "n0"), ("t4", "n0"), ("v100-32g", "n1")], memory), devices,
                   job_name("deploy", "opt-30b", "paper c3", "s512", "llmpq"), site=SiteSettings())
    text = batch_script(job, ["python", "-m", "llmpq.runtime.stage", "/w/job.json"], tmp_path / "out.log", tmp_path)
    lines = text.splitlines()
    assert lines[1] == "#SBATCH --job-name=deploy.opt-30b.paper_c3.s512.llmpq"
    sbatch = [line for line in lines if line.startswith("#SBATCH --time")]
    assert len(sbatch) == 2 and "--ntasks=2 " in sbatch[0] and "--gres=gpu:t4:2" in sbatch[0]
    assert "--gres=gpu:v100:1 --constraint=v100-32g" in sbatch[1]
    assert lines.index("#SBATCH hetjob") == lines.index(sbatch[1]) - 2    # after the component's comment line
    assert lines[-1].endswith("-m llmpq.slurm.batch 2 -- python -m llmpq.runtime.stage /w/job.json")
    assert srun_command(2, ["x"]) == ["srun", "--kill-on-bad-exit=1", "--label", "--het-group=0-1", "x"]
    assert srun_command(1, ["x"]) == ["srun", "--kill-on-bad-exit=1", "--label", "x"]


# ------------------------------------------------------------------ inside a task

# What a task of a two-component step (2 + 1 tasks) saw on the local cluster, and scontrol's view of a component.
HET_ENV = {"SLURM_HET_SIZE": "2", "SLURM_NTASKS_HET_GROUP_0": "2", "SLURM_NTASKS_HET_GROUP_1": "1",
           "SLURM_JOB_ID_HET_GROUP_0": "3", "SLURM_JOB_ID_HET_GROUP_1": "4", "SLURM_JOB_PARTITION": "local2",
           "SLURM_JOB_PARTITION_HET_GROUP_0": "local", "SLURM_JOB_PARTITION_HET_GROUP_1": "local2",
           "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURMD_NODENAME": "vm2", "SLURM_NTASKS": "3"}
SCONTROL = {
    "3": "JobId=3 HetJobId=3 HetJobOffset=0 JobName=t\n   JOB_GRES=gpu:typea:2\n"
         "     Nodes=vm CPU_IDs=0-1 Mem=200 GRES=gpu:typea:2(IDX:0-1)\n",
    "4": "JobId=4 HetJobId=3 HetJobOffset=1 JobName=t\n   JOB_GRES=gpu:typeb:1\n"
         "     Nodes=vm2 CPU_IDs=0 Mem=200 GRES=gpu:typeb:1(IDX:0)\n",
}


def test_a_task_finds_its_component_from_the_step_variables():
    assert task_place(HET_ENV) == TaskPlace(rank=2, component=1, index=0, node="vm2")
    assert task_place({**HET_ENV, "SLURM_PROCID": "1", "SLURMD_NODENAME": "vm"}) == TaskPlace(1, 0, 1, "vm")
    assert task_place({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == TaskPlace(1, 0, 1, "")
    with pytest.raises(ValueError, match="beyond the step's 3 tasks"):
        task_place({**HET_ENV, "SLURM_PROCID": "3"})
    assert node_gres(SCONTROL["3"], "vm") == ["gpu:typea:2"] and node_gres(SCONTROL["3"], "vm2") == []


def test_a_task_on_the_wrong_type_or_partition_is_refused_naming_both():
    place = task_place(HET_ENV)
    right = PlannedPlace(1, "cpu-typeb", 1, "gpu:typeb", "local2")
    assert placement_problem(right, place, HET_ENV, SCONTROL.get) is None
    wrong_type = placement_problem(PlannedPlace(1, "cpu-typea", 1, "gpu:typea", None), place, HET_ENV, SCONTROL.get)
    assert "cpu-typea" in wrong_type and "gres gpu:typea" in wrong_type and "holding gres gpu:typeb:1" in wrong_type
    wrong_partition = placement_problem(PlannedPlace(1, "cpu-typeb", 1, None, "local"), place, HET_ENV, SCONTROL.get)
    assert "partition local)" in wrong_partition and "in partition local2" in wrong_partition
    wrong_component = placement_problem(PlannedPlace(1, "cpu-typeb", 0, None, None), place, HET_ENV, SCONTROL.get)
    assert "component 0" in wrong_component and "runs in component 1 on node vm2" in wrong_component


def test_a_gpu_stage_on_the_wrong_card_fails_before_loading(monkeypatch):
    """A 32 GB V100 stage that lands on a 16 GB card: same name family, memory off by half; both are named."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name="Tesla V100-SXM2-16GB", total_memory=16 * GIB))
    v100 = load_device("v100-32g")
    spec = StageSpec(1, "v100-32g", "n1", "gpu", v100.name, None, 0, 1, (16,), 1, 1, 1, 1, None, 0,
                     name_pattern=v100.name_pattern, memory_gib=v100.memory_gib)
    from llmpq.runtime.caps import DeviceMismatch

    with pytest.raises(DeviceMismatch, match=r"planned v100-32g .*found .*V100-SXM2-16GB.*memory differs"):
        torch_device(spec, 0)


# ------------------------------------------------------------------ the end of a job

# sacct -P -n of a failed two-component job on the local cluster (stage 1 exited 17; srun then ended stage 0)
SACCT = [line.split("|") for line in """8+0|FAILED|143:0|vm|local|billing=1,cpu=1,gres/gpu:typea=1,gres/gpu=1,mem=642M,node=1
8+0.batch|FAILED|143:0|vm||cpu=1,gres/gpu:typea=1,gres/gpu=1,mem=642M,node=1
8+0.0|CANCELLED|0:15|vm||cpu=1,gres/gpu:typea=1,gres/gpu=1,mem=642M,node=1
8+1|FAILED|143:0|vm2|local2|billing=1,cpu=1,gres/gpu:typeb=1,gres/gpu=1,mem=642M,node=1
8+1.0|FAILED|17:0|vm2||cpu=1,gres/gpu:typeb=1,gres/gpu=1,mem=642M,node=1""".splitlines()]


def test_the_failing_component_is_named():
    ends = component_ends("8", 2, SACCT)
    assert [(e.component, e.state, e.exit_code, e.partition) for e in ends] == [
        (0, "FAILED", "0:15", "local"), (1, "FAILED", "17:0", "local2")]
    memory = StageMemory(MIB, 0, 0, 0, 0, 0, 0, GIB)
    devices = {s: load_device(s) for s in ("cpu-typea", "cpu-typeb")}
    job = plan_job(plan_of([("cpu-typea", "n0"), ("cpu-typeb", "n1")], memory, cluster="local-2node"), devices, "x",
                   site=SiteSettings())
    end = JobEnd("8", 143, ends)
    assert [e.component for e in end.failed_components()] == [1]
    lines = describe_end(job, end)
    assert "gres/gpu:typeb=1" in lines[2]
    assert lines[-1].startswith("llmpq slurm: failing component 1: stages 1 (cpu-typeb on plan node n1, SLURM node vm2)")


# ------------------------------------------------------------------ the profile's install step


def test_profile_install_links_where_snakemake_looks(tmp_path, monkeypatch):
    from snakemake.cli import get_profile_dir

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("snakemake.common.APPDIRS", None)
    target = profile_link.install()
    assert target == tmp_path / "xdg" / "snakemake" / "slurm" and target.resolve() == ROOT / "profiles" / "slurm"
    assert get_profile_dir("slurm") == (target, target / "config.yaml")   # what `--profile slurm` resolves to
    assert profile_link.install() == target                                 # a link is replaced
    target.unlink()
    target.mkdir()
    with pytest.raises(profile_link.ProfileError, match="not a link"):
        profile_link.install()
    assert profile_link.install(force=True).is_symlink()
    assert profile_link.remove() == target and not target.exists()
