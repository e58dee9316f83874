"""The runtime on a GPU (`gpu` marker; each test skips with its reason where CUDA or a second GPU is missing):
a one-stage plan of tiny-opt gives HF generate's tokens in the plan's dtype with clocks that add up, its measured
memory is within 15% of the memory model's, and a two-stage ring runs across two GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmpq.config import compose_experiment
from llmpq.config.identity import FoundDevice, matching_device
from llmpq.config.compose import ConfigSearch, load_device
from llmpq.runtime.launch import DeployOptions, deploy
from llmpq.solve.plan import Plan, StageMemoryPlan, StagePlan, to_json

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (the 2-stage ring)")
B, S, N = 4, 16, 6


def this_gpu() -> str:
    """The shipped device config of cuda:0 (name pattern and memory), or skip."""
    props = torch.cuda.get_device_properties(0)
    stems = ConfigSearch().options("device")
    stem = matching_device({s: load_device(s) for s in stems}, FoundDevice(props.name, int(props.total_memory)))
    if stem is None:
        pytest.skip(f"no device config matches {props.name}")
    return stem


@pytest.fixture(scope="module")
def gpu_setup(tiny_opt_dir, tmp_path_factory):
    """A results dir with tiny-opt's 16-bit store, a config dir with a one-node cluster of this GPU type (two of them
    where two are visible), and that experiment."""
    from llmpq.quantize.run import QuantizeJob, quantize_store

    stem = this_gpu()
    root = tmp_path_factory.mktemp("gpu")
    results, conf = root / "results", root / "conf"
    out = results / "quantized" / "tiny-opt" / "gptq-w16"
    quantize_store(QuantizeJob("tiny-opt", tiny_opt_dir, out, "gptq", 16, 128), progress=False)
    count = min(2, torch.cuda.device_count())
    (conf / "cluster").mkdir(parents=True)
    (conf / "cluster" / "gpu-test.yaml").write_text(
        f"name: gpu-test\nnodes:\n  - {{name: n0, devices: {{{stem}: {count}}}}}\npresent: false\n"
        "links:\n  intra_node: {bandwidth_gbps: 64, latency_us: 10}\n  inter_node: {bandwidth_gbps: 12, latency_us: 50}\n")
    exp = compose_experiment([f"model.source={tiny_opt_dir}", "cluster=gpu-test", f"workload.batch={B}",
                              f"workload.prompt_len={S}", f"workload.gen_len={N}"], config_dir=conf)
    return exp, results, stem


def write_plan(path: Path, exp, stem: str, stages: list[tuple[int, int]], dtype: str) -> Path:
    memory = StageMemoryPlan(1, 1, 1, 1, 1, 1, 0, 1 << 30)
    plan = Plan(method="gpu-test", model="tiny-opt", cluster="gpu-test", workload=exp.workload.name,
                quant_scheme="gptq", quant_group_size=128, micro_batch_prefill=2, micro_batch_decode=B,
                stages=tuple(StagePlan(stem, "n0", a, b, (16,) * (b - a), memory, 1.0, 1.0) for a, b in stages),
                prefill_s=0.01, decode_s=0.01, throughput_tok_s=1.0, bottleneck_stage=0, omega=0.0,
                ppl_increase=None, budget=None, latency_source="roofline", omega_source="proxy", status="feasible",
                objective=None, gap=None, plan_source="baseline", dtype=dtype)
    path.write_text(to_json(plan))
    return path


def hf_tokens(model_dir: Path, prompts: list[list[int]], dtype: torch.dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).cuda().eval()
    ids = torch.tensor(prompts, device="cuda")
    config = model.generation_config
    config.update(max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=1)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[:, ids.shape[1]:].tolist()


@needs_cuda
def test_one_stage_on_a_gpu_matches_hf_with_clocks_and_memory(gpu_setup, tiny_opt_dir, tmp_path):
    exp, results, stem = gpu_setup
    plan = write_plan(tmp_path / "plan.json", exp, stem, [(0, 4)], "float16")
    run = deploy(exp, plan, tmp_path / "run.parquet", DeployOptions(), results)
    assert run.sidecar["tokens"] == hf_tokens(tiny_opt_dir, run.sidecar["prompts"], torch.float16)
    for row in run.rows:
        assert row["compute_ms"] + row["wait_ms"] == pytest.approx(row["stage_wall_ms"], rel=0.02)
        assert row["stage_wall_ms"] == pytest.approx(row["wall_ms"], rel=0.02)
        predicted = row["planned_memory_bytes"] - exp.devices[stem].reserve_bytes
        assert abs(row["peak_memory_bytes"] - predicted) / predicted < 0.15, (row["peak_memory_bytes"], predicted)
        assert row["device_used_bytes"] >= row["peak_memory_bytes"]


@needs_cuda
@needs_two
def test_two_stage_ring_across_two_gpus(gpu_setup, tiny_opt_dir, tmp_path):
    exp, results, stem = gpu_setup
    plan = write_plan(tmp_path / "plan.json", exp, stem, [(0, 2), (2, 4)], "float16")
    run = deploy(exp, plan, tmp_path / "run.parquet", DeployOptions(timeout_s=120), results)
    assert run.sidecar["tokens"] == hf_tokens(tiny_opt_dir, run.sidecar["prompts"], torch.float16)
    assert [r["stage"] for r in run.rows] == [0, 0, 1, 1]
    for row in run.rows:
        assert row["compute_ms"] + row["wait_ms"] == pytest.approx(row["stage_wall_ms"], rel=0.02)
