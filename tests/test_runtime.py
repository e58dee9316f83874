"""Deploy: the pipeline runtime runs a plan over 1-3 CPU stage processes and generates what HF generate does."""

from __future__ import annotations

import functools

import json
import time
from pathlib import Path

import pytest
import torch

from llmpq.artifacts import read_table
from llmpq.cli import main
from llmpq.config import QuantSpec, compose_experiment
from llmpq.costmodel.memory import embed_bytes, layer_weight_bytes
from llmpq.models.source import model_shape
from llmpq.runtime.caps import MemoryCapError
from llmpq.runtime.job import RunJob, StageSpec
from llmpq.runtime.kvcache import CacheShape, StageKVCache
from llmpq.runtime.launch import DeployOptions, deploy, launch_command, launch_mode
from llmpq.runtime.report import read_sidecar, tokens_path
from llmpq.runtime.schedule import Fault, plan_steps
from llmpq.runtime.stage import Placement, placement_from_env, run_stage
from llmpq.solve.plan import Plan, StageMemoryPlan, StagePlan, to_json

WORKLOAD = ["workload.batch=5", "workload.prompt_len=16", "workload.gen_len=6"]
B, S, N = 5, 16, 6
TEST_CLUSTERS = {
    # three one-thread CPU devices; not `present`, so the 2-core thread check does not apply
    "cluster/test-cpu3.yaml": "name: test-cpu3\nnodes:\n  - {name: local, devices: {cpu: 3}}\npresent: false\n"
                              "links:\n  intra_node: {bandwidth_gbps: 2.0, latency_us: 100}\n"
                              "  inter_node: {bandwidth_gbps: 1.0, latency_us: 100}\n",
    "cluster/test-capped.yaml": "name: test-capped\nnodes:\n  - {name: local, devices: {cpu: 1, cpu-capped: 1}}\n"
                                "present: false\nlinks:\n  intra_node: {bandwidth_gbps: 2.0, latency_us: 100}\n"
                                "  inter_node: {bandwidth_gbps: 1.0, latency_us: 100}\n",
    "device/cpu-capped.yaml": "defaults:\n  - cpu\n  - _self_\nmemory_gib: 0.0002\nmemory_cap_gib: 0.0002\n",
}


@pytest.fixture(scope="session")
def results(tiny_opt_dir, tmp_path_factory) -> Path:
    """A results directory with tiny-opt's 16-bit store (gptq layout) and RTN stores at 16, 8 and 4 bits."""
    from llmpq.quantize.run import QuantizeJob, quantize_store

    root = tmp_path_factory.mktemp("results")
    for scheme, bits in (("gptq", 16), ("rtn", 16), ("rtn", 8), ("rtn", 4)):
        out = root / "quantized" / "tiny-opt" / f"{scheme}-w{bits}"
        quantize_store(QuantizeJob("tiny-opt", tiny_opt_dir, out, scheme, bits, 128), progress=False)
    return root


@pytest.fixture(scope="session")
def config_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conf")
    for name, text in TEST_CLUSTERS.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    return root


def experiment(tiny_opt_dir: Path, config_dir: Path, cluster: str = "local-cpu"):
    return compose_experiment([f"model.source={tiny_opt_dir}", f"cluster={cluster}", *WORKLOAD], config_dir=config_dir)


@functools.cache
def workload_name() -> str:
    """The name `WORKLOAD`'s overrides give the workload (an overridden workload is named after its content)."""
    return compose_experiment(WORKLOAD).workload.name


def write_plan(path: Path, stages: list[tuple[str, int, int, tuple[int, ...]]], b_p: int, b_d: int,
               cluster: str = "local-cpu", scheme: str = "gptq") -> Path:
    """A hand-made plan (stages: device, start, end, bits) with made-up predictions."""
    memory = StageMemoryPlan(1, 1, 1, 1, 1, 1, 0, 1 << 30)
    plan = Plan(method="test", model="tiny-opt", cluster=cluster, workload=workload_name(), quant_scheme=scheme,
                quant_group_size=128, micro_batch_prefill=b_p, micro_batch_decode=b_d,
                stages=tuple(StagePlan(d, "local", a, b, bits, memory, 2.0, 1.0) for d, a, b, bits in stages),
                prefill_s=0.01, decode_s=0.02, throughput_tok_s=1000.0, bottleneck_stage=0, omega=0.0,
                ppl_increase=None, budget=None, latency_source="profile", omega_source="proxy", status="feasible",
                objective=None, gap=None, plan_source="baseline")
    path.write_text(to_json(plan))
    return path


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], n: int) -> tuple[list[list[int]], torch.Tensor,
                                                                                torch.Tensor]:
    """HF generate, greedy, exactly n new tokens (no EOS stop): ids, logits of the first and last new token."""
    ids = torch.tensor(prompts)
    config = model.generation_config
    config.update(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out.sequences[:, ids.shape[1]:].tolist(), out.logits[0].float(), out.logits[-1].float()


def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def assert_clocks_add_up(rows: list[dict]) -> None:
    """Every runs row: the stage's compute + wait = its phase wall within 2%; repeats >= 3, min <= median <= max."""
    for r in rows:
        assert r["compute_ms"] + r["wait_ms"] == pytest.approx(r["stage_wall_ms"], rel=0.02), r
        assert r["repeats"] >= 3 and r["wall_ms_min"] <= r["wall_ms"] <= r["wall_ms_max"], r


def test_schedule_covers_every_token_once():
    steps = plan_steps(batch=5, prompt_len=16, gen_len=4, b_p=2, b_d=3)
    prefill = [s for s in steps if s.phase == "prefill"]
    decode = [s for s in steps if s.phase == "decode"]
    assert [(s.rows.start, s.rows.stop, s.pos, s.q) for s in prefill] == [(0, 2, 0, 16), (2, 4, 0, 16), (4, 5, 0, 16)]
    assert len(decode) == 3 * 2 and [s.index for s in steps] == list(range(len(steps)))
    assert {(r, s.round) for s in decode for r in s.rows} == {(r, k) for r in range(5) for k in (1, 2, 3)}
    assert all(s.pos == 16 + s.round - 1 and s.q == 1 for s in decode)
    assert plan_steps(batch=3, prompt_len=8, gen_len=1, b_p=3, b_d=1)[-1].phase == "prefill"
    with pytest.raises(ValueError, match="RANK:ROUND:MODE"):
        Fault.parse("1-2-exit")


def test_kv_cache_views_share_rows_across_micro_batch_sizes():
    shape = CacheShape(first_layer=2, layers=2, sequences=4, kv_heads=2, max_len=5, head_dim=3)
    cache = StageKVCache(shape, torch.float32)
    k = torch.ones(2, 2, 3, 3)
    keys, values = cache.view(range(2, 4), 0).update(k, 2 * k, layer_idx=3)
    assert keys.shape == (2, 2, 3, 3) and torch.equal(cache.values[1, 2:4, :, :3], 2 * k)
    keys, _ = cache.view(range(1, 4), 3).update(torch.full((3, 2, 1, 3), 7.0), torch.zeros(3, 2, 1, 3), layer_idx=3)
    assert keys.shape == (3, 2, 4, 3) and torch.equal(keys[1:, :, :3], k) and (keys[:, :, 3] == 7).all()
    assert cache.nbytes == 2 * 2 * 4 * 2 * 5 * 3 * 4
    with pytest.raises(IndexError):
        cache.view(range(0, 1), 0).update(k[:1], k[:1], layer_idx=0)


def test_launcher_choice_and_commands(tmp_path):
    options = DeployOptions()
    assert launch_mode(1, options, {}) == "inprocess"
    assert launch_mode(3, options, {}) == "torchrun"
    assert launch_mode(3, options, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) == "torchrun"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "localhost"}
    assert launch_mode(3, options, slurm) == "srun"
    cmd, env = launch_command("srun", 3, tmp_path / "job.json", slurm)
    assert cmd[:4] == ["srun", "--kill-on-bad-exit=1", "-n", "3"]
    assert cmd[-2:] == ["llmpq.runtime.stage", str(tmp_path / "job.json")]
    assert env["MASTER_ADDR"] and env["MASTER_PORT"].isdigit()
    cmd, _ = launch_command("torchrun", 2, tmp_path / "job.json", {})
    assert "--nproc-per-node=2" in cmd and cmd[cmd.index("-m", 2) + 1] == "llmpq.runtime.stage"
    assert placement_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0"}) == Placement(2, 3, 0)
    assert placement_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Placement(1, 2, 1)
    with pytest.raises(ValueError, match="unknown keys"):
        DeployOptions.from_raw({"timeout": 3})


def test_one_stage_plan_matches_hf_generate(tiny_opt_dir, results, config_dir, tmp_path):
    exp = experiment(tiny_opt_dir, config_dir)
    plan = write_plan(tmp_path / "plan.json", [("cpu-large", 0, 4, (16,) * 4)], b_p=2, b_d=3)
    run = deploy(exp, plan, tmp_path / "run.parquet", DeployOptions(), results)
    tokens, _, _ = hf_greedy(hf_model(tiny_opt_dir), run.sidecar["prompts"], N)
    assert run.sidecar["tokens"] == tokens
    assert len(run.sidecar["prompts"]) == B and {len(p) for p in run.sidecar["prompts"]} == {S}
    table = read_table("runs", tmp_path / "run.parquet").to_pylist()
    assert [(r["stage"], r["phase"], r["steps"]) for r in table] == [(0, "prefill", 3), (0, "decode", 2 * (N - 1))]
    assert all(r["tokens"] == B * N and r["wait_ms"] == 0 and r["compute_ms"] > 0 for r in table)
    assert table[0]["predicted_ms"] == pytest.approx(10.0) and table[1]["predicted_compute_ms"] == pytest.approx(10.0)
    assert table[0]["kv_bytes"] == 4 * 2 * 6 * (S + N) * 64 * 4  # 4 layers, K and V, K_d·b_d = 6 sequences, fp32
    assert_clocks_add_up(table)
    assert table[0]["stage_wall_ms"] == pytest.approx(table[0]["wall_ms"])  # one stage: its wall is the pipeline's


def test_two_stage_plan_via_cli_matches_hf_generate(tiny_opt_dir, results, config_dir, tmp_path, capsys):
    stages = [("cpu-large", 0, 1, (16,)), ("cpu-small", 1, 4, (16,) * 3)]
    plan = write_plan(tmp_path / "plan.json", stages, b_p=3, b_d=1)
    out = tmp_path / "runs" / "test.parquet"
    code = main(["deploy", "--config-dir", str(config_dir), f"model.source={tiny_opt_dir}", *WORKLOAD,
                 f"plan={plan}", f"out={out}", f"results={results}"])
    assert code == 0, capsys.readouterr().err
    assert "2 stage(s)" in capsys.readouterr().out
    side = read_sidecar(out)
    tokens, _, _ = hf_greedy(hf_model(tiny_opt_dir), side["prompts"], N)
    assert side["tokens"] == tokens
    table = read_table("runs", out).to_pylist()
    assert [(r["stage"], r["device"], r["phase"]) for r in table] == [
        (0, "cpu-large", "prefill"), (0, "cpu-large", "decode"),
        (1, "cpu-small", "prefill"), (1, "cpu-small", "decode")]
    assert [r["steps"] for r in table] == [2, 5 * (N - 1)] * 2
    assert table[0]["kv_bytes"] * 3 == table[2]["kv_bytes"]  # one layer against three
    assert all(r["rss_bytes"] > 0 and r["wait_ms"] >= 0 for r in table)
    assert_clocks_add_up(table)
    assert sorted(p.name for p in out.parent.iterdir()) == ["test.parquet", "test.tokens.json"]


def test_three_stage_plan_matches_hf_generate(tiny_opt_dir, results, config_dir, tmp_path):
    exp = experiment(tiny_opt_dir, config_dir, "test-cpu3")
    plan = write_plan(tmp_path / "plan.json", [("cpu", 0, 2, (16, 16)), ("cpu", 2, 3, (16,)), ("cpu", 3, 4, (16,))],
                      b_p=2, b_d=2, cluster="test-cpu3")
    run = deploy(exp, plan, tmp_path / "run.parquet", DeployOptions(timeout_s=30), results)
    tokens, _, _ = hf_greedy(hf_model(tiny_opt_dir), run.sidecar["prompts"], N)
    assert run.sidecar["tokens"] == tokens
    assert [r["stage"] for r in run.rows] == [0, 0, 1, 1, 2, 2]
    assert_clocks_add_up(run.rows)


def test_mixed_bit_plan_matches_the_same_model_in_one_process(tiny_opt_dir, results, config_dir, tmp_path):
    from llmpq.quantize.loader import load_mixed_model

    bits = (8, 4, 16, 4)
    exp = experiment(tiny_opt_dir, config_dir)
    plan = write_plan(tmp_path / "plan.json", [("cpu-large", 0, 2, bits[:2]), ("cpu-small", 2, 4, bits[2:])],
                      b_p=2, b_d=3, scheme="rtn")
    run = deploy(exp, plan, tmp_path / "run.parquet", DeployOptions(record_logits=True), results)
    reference = load_mixed_model(tiny_opt_dir, results / "quantized" / "tiny-opt", bits, scheme="rtn")
    tokens, first, last = hf_greedy(reference, run.sidecar["prompts"], N)
    assert run.sidecar["tokens"] == tokens
    torch.testing.assert_close(torch.tensor(run.sidecar["first_logits"]), first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(run.sidecar["last_logits"]), last, rtol=1e-4, atol=1e-4)
    fp_tokens, _, fp_last = hf_greedy(hf_model(tiny_opt_dir), run.sidecar["prompts"], N)
    assert not torch.allclose(fp_last, last, atol=1e-3)  # the quantized layers really are in use
    shape, device, quant = model_shape(exp.model), exp.devices["cpu-large"], QuantSpec("rtn", 128)
    head = shape.final_norm_params + shape.head_params  # tied to the embedding, which the last stage does not hold
    planned = [sum(layer_weight_bytes(shape, b, quant, device) for b in bits[:2]) + embed_bytes(shape, device),
               sum(layer_weight_bytes(shape, b, quant, device) for b in bits[2:]) + 4 * head]
    measured = [run.rows[0]["weights_bytes"], run.rows[2]["weights_bytes"]]
    assert measured == pytest.approx(planned, rel=0.03)  # each stage holds its layers at their bits and no more


FAKE_SRUN = """#!{python}
\"\"\"Stands in for srun where SLURM is absent: -n copies of the command with SLURM's task variables.\"\"\"
import os, subprocess, sys, time
args, n, kill = sys.argv[1:], 1, False
while args[0].startswith("-"):
    flag = args.pop(0)
    n = int(args.pop(0)) if flag == "-n" else n
    kill = kill or flag == "--kill-on-bad-exit=1"
env = {{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}}
procs = [subprocess.Popen(args, env={{**env, "SLURM_PROCID": str(i), "SLURM_NTASKS": str(n), "SLURM_LOCALID": str(i)}})
         for i in range(n)]
while any(p.poll() is None for p in procs):
    if kill and any(p.poll() not in (None, 0) for p in procs):
        for p in procs:
            p.poll() is None and p.kill()
    time.sleep(0.05)
sys.exit(next((p.returncode for p in procs if p.returncode), 0))
"""


def test_srun_launch_inside_a_slurm_allocation(tiny_opt_dir, results, config_dir, tmp_path, monkeypatch):
    import sys

    from llmpq.artifacts import read_meta

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    exp = experiment(tiny_opt_dir, config_dir)
    stages = [("cpu-large", 0, 3, (16,) * 3), ("cpu-small", 3, 4, (16,))]
    plan = write_plan(tmp_path / "plan.json", stages, b_p=5, b_d=2)
    run = deploy(exp, plan, tmp_path / "run.parquet", DeployOptions(timeout_s=30), results)
    assert read_meta(tmp_path / "run.parquet")["launcher"] == "srun"
    tokens, _, _ = hf_greedy(hf_model(tiny_opt_dir), run.sidecar["prompts"], N)
    assert run.sidecar["tokens"] == tokens


SLURM_JOB_SCRIPT = """#!/bin/bash
# as Snakemake's SLURM job step runs a job: every SLURM_ variable but the allocation's identity dropped
for v in $(env | grep -o '^SLURM_[A-Z_]*'); do
  case $v in SLURM_JOB_ID|SLURM_JOBID|SLURM_CLUSTER_NAME|SLURM_SUBMIT_DIR|SLURM_SUBMIT_HOST) ;; *) unset $v ;; esac
done
exec {command}
"""


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("fault", [None, "1:2:exit"])
def test_deploy_as_a_slurm_job(slurm_cluster, tiny_opt_dir, results, config_dir, tmp_path, fault):
    """A two-task batch job: the launcher finds its allocation, starts the stages with srun, and srun ends the
    job step when a stage fails."""
    import shlex
    import subprocess
    import sys

    from llmpq.artifacts import read_meta

    stages = [("cpu-large", 0, 2, (16, 16)), ("cpu-small", 2, 4, (16, 16))]
    plan = write_plan(tmp_path / "plan.json", stages, b_p=2, b_d=3)
    out = tmp_path / "run.parquet"
    options = ["deploy.timeout_s=10"] + ([f"deploy.fault={fault}"] if fault else [])
    command = shlex.join([sys.executable, "-m", "llmpq.cli", "deploy", "--config-dir", str(config_dir),
                          f"model.source={tiny_opt_dir}", *WORKLOAD, *options, f"plan={plan}", f"out={out}",
                          f"results={results}"])
    (tmp_path / "job.sh").write_text(SLURM_JOB_SCRIPT.format(command=command))
    job = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--time=5", f"--output={tmp_path / 'job.out'}",
                          f"--chdir={tmp_path}", str(tmp_path / "job.sh")],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip().split(";")[0]
    deadline = time.monotonic() + 180
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"SLURM job {job} did not finish in 180 s")
        time.sleep(1)
    log = (tmp_path / "job.out").read_text()
    if fault:
        assert not out.exists() and "injected fault" in log and "no runs table written" in log, log[-3000:]
        return
    assert out.is_file(), log[-3000:]
    assert read_meta(out)["launcher"] == "srun"
    side = read_sidecar(out)
    assert side["tokens"] == hf_greedy(hf_model(tiny_opt_dir), side["prompts"], N)[0]


def random_model(family: str, out: Path, tokenizer_from: Path) -> Path:
    """A small random causal LM of `family` (wide initialisation, so that greedy choices are not near ties),
    saved with tiny-opt's tokenizer, and its 16-bit store under `out/results/quantized/tiny-opt/gptq-w16`."""
    import shutil

    from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, Qwen2Config

    from llmpq.quantize.run import QuantizeJob, quantize_store

    common = {"vocab_size": 512, "hidden_size": 64, "initializer_range": 0.3}
    configs = {
        "llama": lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                     num_hidden_layers=3, max_position_embeddings=128, **common),
        "qwen2": lambda: Qwen2Config(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                     num_hidden_layers=3, max_position_embeddings=128, tie_word_embeddings=True,
                                     **common),
        "bloom": lambda: BloomConfig(n_head=4, n_layer=3, **common),
    }
    torch.manual_seed(0)
    model_dir = out / "model"
    AutoModelForCausalLM.from_config(configs[family]()).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, model_dir / name)
    store = out / "results" / "quantized" / "tiny-opt" / "gptq-w16"
    quantize_store(QuantizeJob("tiny-opt", model_dir, store, "gptq", 16), progress=False)
    return model_dir


@pytest.mark.parametrize("family", ["llama", "qwen2", "bloom"])
def test_other_families_match_hf_generate(tiny_opt_dir, config_dir, tmp_path, family):
    """Rotary positions (GQA, untied and tied heads) and ALiBi: each family's embedding, layer call and head."""
    model_dir = random_model(family, tmp_path, tiny_opt_dir)
    exp = experiment(model_dir, config_dir)
    split = [("cpu-large", 0, 3, (16,) * 3)] if family != "llama" else \
        [("cpu-large", 0, 1, (16,)), ("cpu-small", 1, 3, (16, 16))]
    plan = write_plan(tmp_path / "plan.json", split, b_p=2, b_d=3)
    run = deploy(exp, plan, tmp_path / "run.parquet", DeployOptions(record_logits=True), tmp_path / "results")
    tokens, _, last = hf_greedy(hf_model(model_dir), run.sidecar["prompts"], N)
    assert run.sidecar["tokens"] == tokens
    torch.testing.assert_close(torch.tensor(run.sidecar["last_logits"]), last, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fault", ["1:2:exit", "1:2:hang"])
def test_a_failed_stage_fails_the_whole_run_in_bounded_time(tiny_opt_dir, results, config_dir, tmp_path, fault):
    """Stage 1 of 3 crashes (exit) or stops answering (hang) in decode round 2: `llmpq deploy` exits non-zero
    within the peers' timeout plus the launcher's teardown, and leaves no runs table."""
    import subprocess
    import sys

    stages = [("cpu", 0, 2, (16, 16)), ("cpu", 2, 3, (16,)), ("cpu", 3, 4, (16,))]
    plan = write_plan(tmp_path / "plan.json", stages, b_p=5, b_d=5, cluster="test-cpu3")
    out = tmp_path / "run.parquet"
    out.write_text("an earlier run")
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "llmpq.cli", "deploy", "--config-dir", str(config_dir), f"model.source={tiny_opt_dir}",
         "cluster=test-cpu3", *WORKLOAD, "deploy.timeout_s=4", f"deploy.fault={fault}", f"plan={plan}",
         f"out={out}", f"results={results}"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and time.monotonic() - start < 60, done.stderr[-2000:]
    assert "injected fault" in done.stderr and "no runs table written" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_plan_over_a_memory_cap_is_refused_before_loading(tiny_opt_dir, config_dir, tmp_path, capsys):
    plan = write_plan(tmp_path / "plan.json", [("cpu", 0, 2, (16, 16)), ("cpu-capped", 2, 4, (16, 16))],
                      b_p=5, b_d=5, cluster="test-capped")
    out = tmp_path / "run.parquet"
    code = main(["deploy", "--config-dir", str(config_dir), f"model.source={tiny_opt_dir}", "cluster=test-capped",
                 *WORKLOAD, f"plan={plan}", f"out={out}", f"results={tmp_path / 'no-stores'}"])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists() and not tokens_path(out).exists()
    assert "stage 1 on device cpu-capped" in err and "memory_cap_gib 0.0002" in err and "MiB" in err
    assert "stage 0" not in err and "no quantized store" not in err


def test_stage_process_checks_its_cap_before_loading(tmp_path):
    spec = StageSpec(0, "cpu-capped", "local", "cpu", "cpu", 1, 0, 4, (16,) * 4, planned_weights_bytes=3 << 20,
                     planned_kv_bytes=1 << 20, planned_total_bytes=5 << 20, capacity_bytes=1 << 20, cap_bytes=1 << 20)
    job = RunJob("test", str(tmp_path / "no-model"), str(tmp_path / "no-stores"), "gptq", ((1, 2),), 2, 1, 1,
                 (spec,), str(tmp_path))
    job_path = job.write(tmp_path / "job.json")
    assert RunJob.read(job_path) == job
    with pytest.raises(MemoryCapError, match=r"cpu-capped: planned weights 3\.00 MiB \+ KV cache 1\.00 MiB"):
        run_stage(job, Placement(0, 1, 0), init_dist=False)


def test_plan_for_another_workload_is_refused(tiny_opt_dir, results, config_dir, tmp_path):
    exp = experiment(tiny_opt_dir, config_dir)
    data = json.loads(write_plan(tmp_path / "plan.json", [("cpu-large", 0, 4, (16,) * 4)], 1, 1).read_text())
    data["workload"] = "s512-n100-b32"
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="plan is for model/cluster/workload tiny-opt/local-cpu/s512-n100-b32"):
        deploy(exp, tmp_path / "plan.json", tmp_path / "run.parquet", DeployOptions(), results)


def test_cpu_stages_of_a_local_run_keep_to_their_own_cores(tmp_path):
    """Each CPU stage process takes its `threads` of the allowed cores after those of the stages before it on its
    node; nothing is pinned for one process, a GPU stage, a task already bound to its cores, or too few cores."""
    from llmpq.runtime.stage import stage_cores

    def spec(index, node="local", kind="cpu", threads=1):
        return StageSpec(index, "cpu-large", node, kind, "cpu", threads, index, index + 1, (16,), 1, 1, 1, 1, None)

    def job(*specs):
        return RunJob("test", "m", "q", "gptq", ((1, 2),), 2, 1, 1, specs, str(tmp_path))

    three = job(spec(0, threads=2), spec(1), spec(2, node="other"))
    assert stage_cores(three, Placement(0, 3, 0), [0, 1, 2, 3]) == [0, 1]
    assert stage_cores(three, Placement(1, 3, 1), [0, 1, 2, 3]) == [2]
    assert stage_cores(three, Placement(2, 3, 0), [4, 5]) == [4]            # first on its own node
    assert stage_cores(three, Placement(1, 3, 1), [2, 3, 0, 1]) == [2]      # in core order
    assert stage_cores(job(spec(0)), Placement(0, 1, 0), [0, 1]) is None                   # one process
    assert stage_cores(job(spec(0), spec(1, kind="gpu")), Placement(1, 2, 1), [0, 1]) is None  # a GPU stage
    assert stage_cores(job(spec(0), spec(1)), Placement(1, 2, 0), [7]) is None             # bound already
    assert stage_cores(job(spec(0, threads=2), spec(1, threads=2)), Placement(1, 2, 1), [0, 1, 2]) is None
