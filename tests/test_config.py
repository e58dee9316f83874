"""Config composition and validation: each bad input names its file and key and exits non-zero."""

import textwrap

import pytest

from llmpq.cli import main
from llmpq.config import ConfigError, compose_experiment, load_device

GOOD_CLUSTER = """
name: mine
nodes:
  - {name: a, devices: {t4: 2}}
present: false
links:
  intra_node: {bandwidth_gbps: 16, latency_us: 10}
  inter_node: {bandwidth_gbps: 1.25, latency_us: 50}
"""


def user_dir(tmp_path, group, stem, text):
    (tmp_path / group).mkdir(parents=True, exist_ok=True)
    (tmp_path / group / f"{stem}.yaml").write_text(textwrap.dedent(text))
    return tmp_path


def test_default_composes():
    exp = compose_experiment()
    assert exp.model.name == "tiny-opt"
    assert exp.cluster.name == "local-cpu"
    assert set(exp.devices) == {"cpu-large", "cpu-small"}
    assert exp.devices["cpu-small"].threads == 1
    assert exp.devices["cpu-small"].memory_cap_gib < exp.devices["cpu-large"].memory_cap_gib


@pytest.mark.parametrize("cluster", [f"paper-c{i}" for i in range(1, 12)])
def test_paper_clusters_compose(cluster):
    exp = compose_experiment([f"cluster={cluster}"])
    assert exp.cluster.model in {"opt-13b", "opt-30b", "opt-66b", "bloom-176b"}
    assert all(w in {"s512-n100-b32", "s128-n200-b32"} for w in exp.cluster.workloads)
    assert all(d.kind == "gpu" and d.memory_gib > 0 for d in exp.devices.values())


def test_paper_c3_layout():
    exp = compose_experiment(["cluster=paper-c3", "model=opt-30b"])
    assert exp.cluster.device_slots() == [("n0", "t4")] * 3 + [("n1", "v100-32g")]
    assert exp.devices["t4"].memory_gib == pytest.approx(14.76)


def test_user_config_dir_adds_cluster(tmp_path):
    d = user_dir(tmp_path, "cluster", "mine", GOOD_CLUSTER)
    exp = compose_experiment(["cluster=mine"], config_dir=d)
    assert exp.cluster.device_slots() == [("a", "t4"), ("a", "t4")]


def test_user_config_dir_adds_device(tmp_path):
    user_dir(tmp_path, "device", "x1", """
        name: X1
        memory_gib: 8
        mem_bandwidth_gbps: 100
        fp16_tflops: 10
        bits: [16, 4]
    """)
    d = user_dir(tmp_path, "cluster", "mine", GOOD_CLUSTER.replace("t4: 2", "x1: 1, t4: 1"))
    exp = compose_experiment(["cluster=mine"], config_dir=d)
    assert exp.devices["x1"].bits == (16, 4)
    assert load_device("x1", config_dir=d).memory_gib == 8


@pytest.mark.parametrize("bad, key, text", [
    (GOOD_CLUSTER.replace("t4: 2", "x100: 2"), "nodes[0].devices.x100", "unknown device 'x100'"),
    (GOOD_CLUSTER.replace("t4: 2", "t4: 0"), "nodes[0].devices.t4", "must be > 0"),
    (GOOD_CLUSTER.replace("t4: 2", "t4: two"), "nodes[0].devices.t4", "expected int"),
    (GOOD_CLUSTER.replace("name: mine\n", ""), "name", "missing required key"),
    (GOOD_CLUSTER.replace("bandwidth_gbps: 16", "bandwidth_gbps: fast"), "links.intra_node.bandwidth_gbps", "expected float"),
    (GOOD_CLUSTER.replace("nodes:\n  - {name: a, devices: {t4: 2}}", "nodes: []"), "nodes", "at least one node"),
])
def test_bad_cluster_names_file_and_key(tmp_path, bad, key, text):
    d = user_dir(tmp_path, "cluster", "mine", bad)
    with pytest.raises(ConfigError) as err:
        compose_experiment(["cluster=mine"], config_dir=d)
    assert err.value.key == key
    assert err.value.file.endswith("cluster/mine.yaml")
    assert text in err.value.message


def test_unknown_group_option():
    with pytest.raises(ConfigError) as err:
        compose_experiment(["workload=nope"])
    assert err.value.key == "workload"
    assert "s512-n100-b32" in err.value.message


def test_override_type_error_names_workload_file():
    with pytest.raises(ConfigError) as err:
        compose_experiment(["workload.gen_len=many"])
    assert err.value.file.endswith("workload/s64-n16-b8.yaml") and err.value.key == "gen_len"


def test_bad_device_bits(tmp_path):
    user_dir(tmp_path, "device", "x1", "name: X1\nmemory_gib: 8\nmem_bandwidth_gbps: 100\nfp16_tflops: 10\nbits: [16, 5]\n")
    d = user_dir(tmp_path, "cluster", "mine", GOOD_CLUSTER.replace("t4: 2", "x1: 1"))
    with pytest.raises(ConfigError, match="unsupported bit-widths"):
        compose_experiment(["cluster=mine"], config_dir=d)


def test_cpu_threads_exceeding_cores(tmp_path):
    d = user_dir(tmp_path, "cluster", "mine", GOOD_CLUSTER.replace("t4: 2", "cpu: 64").replace("present: false", "present: true"))
    with pytest.raises(ConfigError, match="threads"):
        compose_experiment(["cluster=mine"], config_dir=d)


def test_two_budgets_refused():
    with pytest.raises(ConfigError, match="one quality budget"):
        compose_experiment(["solver.max_omega=1.0", "solver.budget_from=pipeedge"])


def test_cli_config_ok(capsys):
    assert main(["config", "cluster=paper-c3"]) == 0
    assert '"paper-c3"' in capsys.readouterr().out


def test_cli_config_error_exit_code(tmp_path, capsys):
    d = user_dir(tmp_path, "cluster", "mine", GOOD_CLUSTER.replace("t4: 2", "x100: 2"))
    assert main(["config", "--config-dir", str(d), "cluster=mine"]) == 2
    err = capsys.readouterr().err
    assert "cluster/mine.yaml" in err and "nodes[0].devices.x100" in err


DEVICE_X1 = "name: X1\nmemory_gib: 8\nmem_bandwidth_gbps: 100\nfp16_tflops: 10\nbits: [16, 4]\n"


@pytest.mark.parametrize("group, stem, text, key, near", [
    ("device", "x1", DEVICE_X1 + "reserve_gb: 3\n", "reserve_gb", "reserve_gib"),
    ("device", "x1", DEVICE_X1 + "efficiency: {prefill: 0.5, decod: 0.5}\n", "efficiency.decod", "decode"),
    ("cluster", "mine", GOOD_CLUSTER.replace("present: false", "presnt: true"), "presnt", "present"),
    ("cluster", "mine", GOOD_CLUSTER.replace("{name: a, devices", "{name: a, device_count: 1, devices"),
     "nodes[0].device_count", None),
    ("model", "m1", "name: m1\nsource: x\nfamily: opt\nbits: [16]\nquant: {scheme: gptq, group_sise: 64}\n",
     "quant.group_sise", "group_size"),
    ("workload", "w1", "name: w1\nprompt_len: 8\ngen_len: 4\nbatch: 2\ngen_lenght: 5\n", "gen_lenght", "gen_len"),
    ("solver", "s1", "name: s1\nmethod: llmpq\ntime_limit: 5\n", "time_limit", "time_limit_s"),
])
def test_unknown_keys_refused_with_nearest(tmp_path, group, stem, text, key, near):
    d = user_dir(tmp_path, group, stem, text)
    overrides = {"device": ["cluster=mine"], "cluster": [f"cluster={stem}"]}.get(group, [f"{group}={stem}"])
    if group == "device":
        user_dir(tmp_path, "cluster", "mine", GOOD_CLUSTER.replace("t4: 2", "x1: 1"))
    with pytest.raises(ConfigError) as err:
        compose_experiment(overrides, config_dir=d)
    assert err.value.key == key
    assert err.value.file.endswith(f"{group}/{stem}.yaml")
    assert "unknown key" in err.value.message
    if near:
        assert f"did you mean `{near}`" in err.value.message


def test_cpu_cap_typo_refused():
    """`memory_cap_gb` once replaced a 2 MiB cap with the inherited 4 GiB without a word."""
    with pytest.raises(ConfigError, match="memory_cap_gib"):
        from llmpq.config.validate import device_spec

        device_spec("cpu-x", "device/cpu-x.yaml", {"name": "cpu", "kind": "cpu", "threads": 1, "memory_gib": 1,
                                                   "mem_bandwidth_gbps": 1, "fp16_tflops": 1, "bits": [16],
                                                   "memory_cap_gb": 0.002})


def test_missing_required_key_names_the_typo():
    from llmpq.config.validate import device_spec

    with pytest.raises(ConfigError, match="is `memory_gb` a typo") as err:
        device_spec("x1", "device/x1.yaml", {"name": "X", "memory_gb": 8, "mem_bandwidth_gbps": 1,
                                             "fp16_tflops": 1, "bits": [16]})
    assert err.value.key == "memory_gib"


def test_user_device_file_wins_over_shipped(tmp_path):
    """A site's own device/t4.yaml replaces the shipped one (and changes what the planner sees)."""
    shipped = compose_experiment(["cluster=paper-c3", "model=opt-30b"]).devices["t4"]
    d = user_dir(tmp_path, "device", "t4", DEVICE_X1.replace("name: X1", "name: Tesla_T4_site").replace("8", "15"))
    mine = compose_experiment(["cluster=paper-c3", "model=opt-30b"], config_dir=d)
    assert mine.devices["t4"].name == "Tesla_T4_site" and mine.devices["t4"].bits == (16, 4)
    assert mine.devices["t4"].memory_gib == 15 != shipped.memory_gib
    assert load_device("t4", config_dir=d).name == "Tesla_T4_site"


def test_config_dir_from_environment(tmp_path, monkeypatch):
    d = user_dir(tmp_path, "cluster", "mine", GOOD_CLUSTER)
    monkeypatch.setenv("LLMPQ_CONFIG_DIR", str(d))
    assert compose_experiment(["cluster=mine"]).cluster.name == "mine"


@pytest.mark.parametrize("content, text", [
    (None, "no such plan"),
    ("{not json", "not JSON"),
    ('{"schema_version": 1}', "missing key"),
])
def test_bad_plan_is_one_message(tmp_path, capsys, content, text):
    plan = tmp_path / "plan.json"
    if content is not None:
        plan.write_text(content)
    assert main(["explain", f"plan={plan}"]) == 1
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and err.count("\n") == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("llmpq ")


def test_cli_uses_the_clusters_own_model_and_workload(capsys):
    import json

    assert main(["config", "cluster=paper-c3"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert (raw["model"]["name"], raw["workload"]["name"]) == ("opt-30b", "s512-n100-b32")


def test_cli_refuses_to_guess_among_a_clusters_workloads(capsys):
    assert main(["config", "cluster=paper-c1"]) == 2
    err = capsys.readouterr().err
    assert "s512-n100-b32, s128-n200-b32" in err and "workload=" in err


def test_overridden_workload_gets_its_own_name():
    base = compose_experiment(["cluster=paper-c3", "model=opt-30b", "workload=s512-n100-b32"])
    longer = compose_experiment(["cluster=paper-c3", "model=opt-30b", "workload=s512-n100-b32", "workload.gen_len=200"])
    again = compose_experiment(["cluster=paper-c3", "model=opt-30b", "workload=s512-n100-b32", "workload.gen_len=200"])
    assert base.workload.name == "s512-n100-b32"
    assert longer.workload.name.startswith("s512-n100-b32-") and longer.workload.name == again.workload.name


def test_null_optional_blocks_are_accepted(tmp_path):
    """`efficiency: null` and `slurm: null` in a device file mean the defaults, as before strict keys."""
    from llmpq.config.validate import device_spec

    data = {"kind": "gpu", "name": "X", "memory_gib": 16, "mem_bandwidth_gbps": 300, "fp16_tflops": 65,
            "bits": [16, 8, 4], "efficiency": None, "slurm": None}
    spec = device_spec("x", "device/x.yaml", data)
    assert spec.efficiency.prefill == 0.5 and spec.slurm.gpu_model is None
