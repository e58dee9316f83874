"""The memory model against what a real stage process holds: a two-stage CPU plan, each stage's peak RSS growth over
the RSS it noted just before loading (sampled every few ms during the run) against the plan's memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpq.artifacts import read_table
from llmpq.config import compose_experiment
from llmpq.costmodel.memory import POSTED_MESSAGES
from llmpq.runtime.launch import DeployOptions, deploy
from llmpq.solve.plan import Plan, StageMemoryPlan, StagePlan, to_json

CLUSTER = ("name: test-mem\nnodes:\n  - {name: local, devices: {cpu: 2}}\npresent: false\n"
           "links:\n  intra_node: {bandwidth_gbps: 2.0, latency_us: 100}\n"
           "  inter_node: {bandwidth_gbps: 1.0, latency_us: 100}\n")
# big enough that the stage's data (KV cache, prefill activations, messages) dominates the few MiB of Python
# objects a stage process also creates, which the model does not count
B, S, N, B_P, B_D = 64, 192, 8, 32, 64


@pytest.fixture(scope="module")
def stores(tiny_opt_dir, tmp_path_factory) -> Path:
    from llmpq.quantize.run import QuantizeJob, quantize_store

    root = tmp_path_factory.mktemp("results")
    for bits in (16, 8):
        quantize_store(QuantizeJob("tiny-opt", tiny_opt_dir, root / "quantized" / "tiny-opt" / f"rtn-w{bits}", "rtn",
                                   bits, 128), progress=False)
    return root


@pytest.mark.slow
def test_two_stage_rss_growth_matches_the_memory_model_within_15_percent(tiny_opt_dir, stores, tmp_path):
    conf = tmp_path / "conf"
    (conf / "cluster").mkdir(parents=True)
    (conf / "cluster" / "test-mem.yaml").write_text(CLUSTER)
    exp = compose_experiment([f"model.source={tiny_opt_dir}", "cluster=test-mem", f"workload.batch={B}",
                              f"workload.prompt_len={S}", f"workload.gen_len={N}"], config_dir=conf)
    memory = StageMemoryPlan(1, 1, 1, 1, 1, 1, 0, 1 << 30)  # deploy computes the plan's memory itself
    stages = (StagePlan("cpu", "local", 0, 2, (16, 16), memory, 1.0, 1.0, ((16, "fp16"),)),
              StagePlan("cpu", "local", 2, 4, (8, 8), memory, 1.0, 1.0, ((8, "torch"),)))
    plan = Plan(method="test", model="tiny-opt", cluster="test-mem", workload=exp.workload.name, quant_scheme="rtn",
                quant_group_size=128, micro_batch_prefill=B_P, micro_batch_decode=B_D, stages=stages, prefill_s=1.0,
                decode_s=1.0, throughput_tok_s=1.0, bottleneck_stage=0, omega=0.0, ppl_increase=None, budget=None,
                latency_source="profile", omega_source="proxy", status="feasible", objective=None, gap=None,
                plan_source="baseline")
    (tmp_path / "plan.json").write_text(to_json(plan))
    run = deploy(exp, tmp_path / "plan.json", tmp_path / "run.parquet", DeployOptions(timeout_s=120), stores)
    rows = [r for r in read_table("runs", tmp_path / "run.parquet").to_pylist() if r["phase"] == "prefill"]
    assert [r["kernels"] for r in rows] == ["16:fp16", "8:torch"]
    hidden = min(-(-B // B_P), POSTED_MESSAGES) * B_P * S * 64 * 4
    assert rows[0]["planned_memory_bytes"] > 2 * hidden  # the posted messages are a visible part of the plan
    for r in rows:
        growth, planned = r["rss_growth_bytes"], r["planned_memory_bytes"]
        assert growth == pytest.approx(planned, rel=0.15), (r["stage"], growth, planned)
    assert run.sidecar["tokens"] and len(run.sidecar["tokens"]) == B


def test_trimming_sampler_does_not_count_freed_heap():
    """Small tensors freed between samples leave free pages in glibc's heap: the untrimmed RSS keeps them, a
    trimming sample (a CPU stage's memory pass) hands them back and sees what is still live."""
    import torch

    from llmpq.runtime.measure import RssSampler, current_rss_bytes, release_free_heap, return_freed_memory

    if not (return_freed_memory() and release_free_heap()):
        pytest.skip("glibc is not the allocator here")
    sampler = RssSampler(trim=True)
    garbage = [torch.ones(1024) for _ in range(4096)]     # 16 MiB in 4 KiB tensors, below the mmap threshold
    kept = garbage[::64]                                    # 256 KiB left scattered through the heap
    del garbage
    untrimmed = current_rss_bytes()
    trimmed = sampler._sample()
    assert all(float(t.sum()) == 1024 for t in kept)
    assert untrimmed - trimmed > 8 << 20
