"""Export: engine rules (what vLLM/SGLang run fast), the planner's `solver.engine`, and `llmpq export`
directories that GPTQModel's own loader reads on CPU and that generate what `llmpq deploy` generates."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmpq.cli import main
from llmpq.config import ConfigError, DeviceSpec, compose_experiment
from llmpq.export.engine import allowed_bits, plan_violations, quantized_kernel
from llmpq.export.launch import engine_settings, vllm_script
from llmpq.export.run import ExportRefused, export_plan
from llmpq.models.shape import LinearShape
from llmpq.models.source import model_shape
from llmpq.quantize.settings import LinearQuant
from llmpq.solve.plan import read_plan
from test_runtime import WORKLOAD, hf_greedy, write_plan

B, S, N = 5, 16, 6
CONF = {
    "device/p100-cc.yaml": "defaults:\n  - p100-12g\n  - _self_\ncompute_capability: 6.0\n",
    "device/v100-cc.yaml": "defaults:\n  - v100-32g\n  - _self_\ncompute_capability: 7.0\n",
    "device/a100-cc.yaml": "defaults:\n  - a100-40g\n  - _self_\ncompute_capability: 8.0\n",
    "cluster/mixed-cc.yaml": "name: mixed-cc\nnodes:\n  - {name: n0, devices: {p100-cc: 2, v100-cc: 1}}\npresent: false\n"
                             "links:\n  intra_node: {bandwidth_gbps: 16, latency_us: 10}\n"
                             "  inter_node: {bandwidth_gbps: 1.25, latency_us: 50}\n",
    "cluster/gpu-one.yaml": "name: gpu-one\nnodes:\n  - {name: local, devices: {v100-cc: 1, t4: 1, a100-cc: 1}}\n"
                            "present: false\nlinks:\n  intra_node: {bandwidth_gbps: 16, latency_us: 10}\n"
                            "  inter_node: {bandwidth_gbps: 1.25, latency_us: 50}\n",
    "cluster/gpu-pair.yaml": "name: gpu-pair\nnodes:\n  - {name: n0, devices: {a100-cc: 1}}\n"
                             "  - {name: n1, devices: {v100-cc: 1}}\npresent: false\n"
                             "links:\n  intra_node: {bandwidth_gbps: 16, latency_us: 10}\n"
                             "  inter_node: {bandwidth_gbps: 1.25, latency_us: 50}\n",
}
OPT_4096 = tuple(LinearShape(n, 4096, 4096, True) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                               "self_attn.out_proj"))
OPT_4096 += (LinearShape("fc1", 4096, 16384, True), LinearShape("fc2", 16384, 4096, True))


def device(kind: str = "gpu", cc: float | None = None, bits=(16, 8, 4, 3, 2)) -> DeviceSpec:
    return DeviceSpec(stem="d", name="D", kind=kind, memory_gib=16, mem_bandwidth_gbps=900, fp16_tflops=100,
                      int8_tops=None, bits=tuple(bits), compute_capability=cc, threads=1 if kind == "cpu" else None)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conf")
    for name, text in CONF.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def results(tiny_opt_dir, tmp_path_factory) -> Path:
    """tiny-opt's GPTQ stores at 16, 8 and 4 bits (GPTQModel on Shakespeare windows) and an RTN 3-bit one."""
    from llmpq.quantize.calibration import CalibrationSpec
    from llmpq.quantize.run import QuantizeJob, quantize_store

    root = tmp_path_factory.mktemp("results")
    for scheme, bits in (("gptq", 16), ("gptq", 8), ("gptq", 4), ("rtn", 16), ("rtn", 3)):
        calibration = CalibrationSpec("shakespeare", 8, 64) if scheme == "gptq" and bits < 16 else None
        quantize_store(QuantizeJob("tiny-opt", tiny_opt_dir, root / "quantized" / "tiny-opt" / f"{scheme}-w{bits}",
                                   scheme, bits, 128, calibration=calibration), progress=False)
    return root


def experiment(tiny_opt_dir: Path, config_dir: Path, cluster: str = "local-cpu"):
    return compose_experiment([f"model.source={tiny_opt_dir}", f"cluster={cluster}", *WORKLOAD], config_dir=config_dir)


def vllm_rule(dynamic: dict, module: str):
    """vLLM's reading of `dynamic` (`gptq_utils.get_dynamic_override`): the first rule whose regex matches the
    module name from its start; a `-:` rule means unquantized (False); None when no rule matches."""
    for pattern, override in dynamic.items():
        if re.match(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern, module):
            return False if pattern.startswith("-:") else override
    return None


def load_with_gptqmodel(directory: Path, quantized: bool) -> torch.nn.Module:
    """GPTQModel's own loader on CPU (TORCH kernels), computing in float32 afterwards.

    GPTQModel's CPU kernels accept fp16/bf16 only: quantized exports load in fp16 (scales are fp16, so the
    dequantized weights stay exact) and are then cast; plain exports load in float32 directly.
    """
    from llmpq.quantize.gptq_layout import gptqmodel

    gptqmodel()
    from gptqmodel import BACKEND, GPTQModel

    loaded = GPTQModel.load(str(directory), device="cpu", backend=BACKEND.TORCH,
                            dtype=torch.float16 if quantized else torch.float32)
    return loaded.model.float().eval()


# ---- engine rules -------------------------------------------------------------------------------------------


def test_kernel_per_device_follows_compute_capability():
    assert quantized_kernel(device(cc=9.0)) == "marlin"
    assert quantized_kernel(device(cc=8.0)) == "marlin"
    assert quantized_kernel(device(cc=7.5)) == "gptq_gemm"
    assert quantized_kernel(device(cc=7.0)) == "gptq_gemm"
    assert quantized_kernel(device(cc=6.0)) is None
    assert quantized_kernel(device(cc=None)) == "gptq_gemm"   # not given: held to the generic kernel's limits
    assert quantized_kernel(device(kind="cpu")) == "cpu"


def test_allowed_bits_per_device_and_layer_shape():
    assert allowed_bits("vllm", device(cc=8.0), OPT_4096, 128) == (16, 8, 4)
    assert allowed_bits("vllm", device(cc=7.0), OPT_4096, 128) == (16, 8, 4)
    assert allowed_bits("vllm", device(cc=6.0), OPT_4096, 128) == (16,)
    assert allowed_bits("sglang", device(kind="cpu", bits=(16, 4, 2)), OPT_4096, 128) == (16, 4)
    hidden_576 = (LinearShape("self_attn.q_proj", 576, 576, False), LinearShape("mlp.down_proj", 1536, 576, False))
    assert allowed_bits("vllm", device(cc=7.0), hidden_576, 128) == (16,)        # 576 is not a multiple of 128
    assert allowed_bits("vllm", device(cc=7.0), hidden_576, 64) == (16, 8, 4)    # ... but of 64
    assert allowed_bits("vllm", device(cc=8.0), hidden_576, 64) == (16,)         # Marlin's 128-wide input tile
    tiny = (LinearShape("self_attn.q_proj", 64, 64, True), LinearShape("fc2", 256, 64, True))
    assert allowed_bits("vllm", device(cc=7.0), tiny, 128) == (16, 8, 4)         # one group spans 64 inputs
    with pytest.raises(ValueError, match="unknown engine"):
        allowed_bits("tgi", device(), tiny, 128)


def test_plan_violations_name_each_layer_and_rule(tiny_opt_dir, config_dir, tmp_path):
    exp = experiment(tiny_opt_dir, config_dir)
    linears = model_shape(exp.model).layer.linears
    plan = read_plan(write_plan(tmp_path / "p.json", [("cpu-large", 0, 2, (16, 3)), ("cpu-small", 2, 4, (2, 4))], 2, 3))
    found = plan_violations("vllm", plan, exp.devices, linears, 128)
    assert [(v.layer, v.stage, v.rule) for v in found] == [(1, 0, "bits"), (2, 1, "bits")]
    assert str(found[0]).startswith("layer 1 (stage 0): bits: cpu-large: 3-bit")
    stored = {3: {n.name: LinearQuant(4, 128, sym=n.name != "fc1") for n in linears}}
    found = plan_violations("vllm", plan, exp.devices, linears, 128, stored)
    assert {(v.layer, v.rule) for v in found if v.layer == 3} == {(3, "symmetric"), (3, "fused_precision")}
    assert plan_violations("vllm", read_plan(write_plan(tmp_path / "ok.json", [("cpu-large", 0, 4, (16, 8, 4, 4))],
                                                        1, 1)), exp.devices, linears, 128) == []


def test_engine_settings_map_the_plan_onto_the_engine_knobs(tiny_opt_dir, config_dir, tmp_path):
    exp = experiment(tiny_opt_dir, config_dir)
    plan = read_plan(write_plan(tmp_path / "p.json", [("cpu-large", 0, 1, (16,)), ("cpu-small", 1, 4, (8, 4, 4))], 2, 3))
    s = engine_settings(plan, exp.workload, exp.devices)
    assert (s.stages, s.partition, s.max_model_len, s.max_num_seqs, s.max_batched_tokens, s.max_running) == \
        (2, (1, 3), S + N, 3, 2 * S, B)
    assert not s.force_generic and not s.multi_node


def test_launch_script_puts_each_rank_on_its_gpu(tiny_opt_dir, config_dir, tmp_path):
    """One node, V100 then T4: CUDA_VISIBLE_DEVICES must list them in stage order, and neither has Marlin, so
    the generic kernel is forced; two nodes: Ray; all on an A100 (Marlin): no kernel flag, no GPU order."""
    exp = experiment(tiny_opt_dir, config_dir, "gpu-one")

    def script(stages, nodes=None) -> str:
        plan = read_plan(write_plan(tmp_path / "p.json", stages, 2, 3, cluster="gpu-one"))
        if nodes:
            plan = replace(plan, stages=tuple(replace(s, node=n) for s, n in zip(plan.stages, nodes)))
        return vllm_script(plan, exp.workload, exp.devices, engine_settings(plan, exp.workload, exp.devices))

    mixed = script([("v100-cc", 0, 2, (8, 4)), ("t4", 2, 4, (4, 16))])
    assert ': "${CUDA_VISIBLE_DEVICES:?set CUDA_VISIBLE_DEVICES to the GPU indices in stage order: ' \
           'Tesla_V100-SXM2-32GB, Tesla_T4}"' in mixed
    assert "--quantization gptq" in mixed and "ray" not in mixed
    assert "rank 1: t4 (Tesla_T4, cc 7.5) on node local, layers 2-3 (2), bits 4 16, kernels fp16/gptq_gemm" in mixed
    nodes = script([("v100-cc", 0, 2, (16, 16)), ("t4", 2, 4, (16, 16))], ("n0", "n1"))
    assert "--distributed-executor-backend ray" in nodes and "CUDA_VISIBLE_DEVICES:?" not in nodes
    assert "--quantization" not in nodes   # nothing quantized
    marlin = script([("a100-cc", 0, 4, (8, 4, 4, 16))])
    assert "--quantization" not in marlin and "CUDA_VISIBLE_DEVICES" not in marlin and "kernels fp16/marlin" in marlin


def test_solver_engine_is_validated(config_dir):
    with pytest.raises(ConfigError, match="engine"):
        compose_experiment(["solver.engine=tgi"], config_dir=config_dir)
    assert compose_experiment([], config_dir=config_dir).solver.engine is None
    exp = compose_experiment(["cluster=mixed-cc"], config_dir=config_dir)
    assert exp.devices["p100-cc"].compute_capability == 6.0


def test_planner_with_engine_vllm_never_plans_what_vllm_cannot_run_fast(config_dir, tmp_path):
    """opt-13b on 2×P100 (cc 6.0) + V100 (cc 7.0), shapes only: with `solver.engine: vllm` every layer is 16, 8
    or 4 bits and the P100 stages stay at 16 bits (vLLM has no quantized kernel there, while llmpq's own runtime
    would run ExLlama or Torch kernels on them)."""
    from llmpq.export.engine import restrict_devices
    from llmpq.solve.planner import solve

    base = ["model=opt-13b", "cluster=mixed-cc", "workload=s512-n100-b32", "solver.time_limit_s=5"]
    exp = compose_experiment(base, config_dir=config_dir)
    assert 3 in exp.devices["p100-cc"].bits
    plans = {method: solve(compose_experiment(base + [f"solver={method}", "solver.engine=vllm", "solver.time_limit_s=5"],
                                              config_dir=config_dir), tmp_path).plan for method in ("llmpq", "pipeedge")}
    for method, plan in plans.items():
        assert set(plan.bits) <= {16, 8, 4}, (method, plan.bits)
        assert all(set(s.bits) == {16} for s in plan.stages if s.device == "p100-cc"), (method, plan.stages)
    assert {8, 4} & set(plans["llmpq"].bits)   # the V100 still gets the low bits vLLM runs


# ---- llmpq export ----------------------------------------------------------------------------------------------


def test_export_refuses_a_3_bit_layer_naming_it(tiny_opt_dir, config_dir, tmp_path, capsys):
    plan = write_plan(tmp_path / "plan.json", [("cpu-large", 0, 2, (16, 16)), ("cpu-small", 2, 4, (3, 16))], 2, 3,
                      scheme="rtn")
    out = tmp_path / "out"
    code = main(["export", "--config-dir", str(config_dir), f"model.source={tiny_opt_dir}", *WORKLOAD, f"plan={plan}",
                 "engine=vllm", f"out={out}", f"results={tmp_path / 'none'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "layer 2 (stage 1): bits: cpu-small: 3-bit" in err and str(plan) in err
    assert not out.exists()
    assert main(["export", f"model.source={tiny_opt_dir}", *WORKLOAD, f"plan={plan}", f"out={out}"]) == 2
    assert "engine=" in capsys.readouterr().err


def test_export_refuses_marlin_shapes_it_cannot_tile(tiny_opt_dir, config_dir, tmp_path):
    """tiny-opt's 64-wide layers at 4 bits on an A100 (Marlin needs inputs in multiples of 128); the
    same layer on a V100 (generic kernel) passes the rules."""
    exp = experiment(tiny_opt_dir, config_dir, "gpu-pair")
    plan = write_plan(tmp_path / "plan.json", [("a100-cc", 0, 2, (16, 4)), ("v100-cc", 2, 4, (4, 16))], 2, 3,
                      cluster="gpu-pair")
    with pytest.raises(ExportRefused) as info:
        export_plan(exp, plan, "vllm", tmp_path / "out", tmp_path / "none")
    assert {(v.layer, v.rule) for v in info.value.violations} == {(1, "marlin_shape")}
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mixed_plan_export_loads_in_gptqmodel_and_generates_what_deploy_does(tiny_opt_dir, results, config_dir,
                                                                            tmp_path):
    """GPTQ 16/8/4/4 over two stages: deploy it, export it (sharded), load the directory with GPTQModel on CPU:
    the same greedy tokens, quantized weights bit-identical to the deployed ones, `dynamic` = the plan's bits."""
    from llmpq.quantize.gptq_layout import dequantize
    from llmpq.quantize.loader import load_mixed_model
    from llmpq.runtime.launch import DeployOptions, deploy

    bits = (16, 8, 4, 4)
    exp = experiment(tiny_opt_dir, config_dir)
    plan = write_plan(tmp_path / "plan.json", [("cpu-large", 0, 2, bits[:2]), ("cpu-small", 2, 4, bits[2:])], 2, 3)
    run = deploy(exp, plan, tmp_path / "run.parquet", DeployOptions(), results)
    out = tmp_path / "export"
    result = export_plan(exp, plan, "vllm", out, results, shard_bytes=200_000)

    assert len(result.weights.files) > 1 and (out / "model.safetensors.index.json").is_file()
    quant = json.loads((out / "quantize_config.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization_config"] == quant
    assert (quant["bits"], quant["sym"], quant["checkpoint_format"]) == (4, True, "gptq")
    from gptqmodel.quantization.config import dynamic_get

    for i, b in enumerate(bits):
        for module in ("self_attn.q_proj", "self_attn.qkv_proj", "fc1", "fc2"):   # qkv_proj: vLLM's fused name
            name = f"model.decoder.layers.{i}.{module}"
            for rule in (dynamic_get(quant["dynamic"], name), vllm_rule(quant["dynamic"], name)):
                assert (rule is False) if b == 16 else rule["bits"] == b, (name, rule)
        if b < 16:   # fc2 keeps its 128-wide groups; the 64-wide linears are one group each (per-channel)
            assert vllm_rule(quant["dynamic"], f"model.decoder.layers.{i}.fc2")["group_size"] == 128
            assert vllm_rule(quant["dynamic"], f"model.decoder.layers.{i}.fc1")["group_size"] == -1
    launch = (out / "launch.sh").read_text()
    assert 'VLLM_PP_LAYER_PARTITION="2,2"' in launch and "--pipeline-parallel-size 2" in launch
    assert "--max-num-seqs 3" in launch and f"--max-num-batched-tokens {2 * S}" in launch

    model = load_with_gptqmodel(out, quantized=True)
    deployed = load_mixed_model(tiny_opt_dir, results / "quantized" / "tiny-opt", bits)
    for i, b in enumerate(bits):
        for name in ("self_attn.q_proj", "fc2"):
            ours, theirs = (m.model.decoder.layers[i].get_submodule(name) for m in (deployed, model))
            if b < 16:
                assert type(theirs).__name__ != "Linear" and theirs.bits == b
                assert torch.equal(dequantize(ours), dequantize(theirs))
            else:
                assert isinstance(theirs, torch.nn.Linear)
    tokens, _, _ = hf_greedy(model, run.sidecar["prompts"], N)
    assert tokens == run.sidecar["tokens"]


@pytest.mark.slow
def test_sglang_export_writes_its_launch_script(tiny_opt_dir, results, config_dir, tmp_path):
    exp = experiment(tiny_opt_dir, config_dir)
    plan = write_plan(tmp_path / "plan.json", [("cpu-large", 0, 3, (16, 8, 8)), ("cpu-small", 3, 4, (4,))], 2, 3)
    out = tmp_path / "sglang"
    export_plan(exp, plan, "sglang", out, results)
    script = (out / "launch_sglang.sh").read_text()
    assert 'SGLANG_PP_LAYER_PARTITION="3,1"' in script and "--pp-size 2" in script
    assert "--pp-max-micro-batch-size 3" in script and f"--chunked-prefill-size {2 * S}" in script
    assert not (out / "launch.sh").exists()
    assert "| 1 | cpu-small |" in (out / "README.md").read_text()


@pytest.mark.slow
def test_default_workflow_plan_exports_and_loads(finished_workflow, monkeypatch, tmp_path, capsys):
    """The default workflow's llmpq plan (tiny-opt, GPTQ stores) through the CLI: GPTQModel reads the directory
    on CPU and generates the workflow's deployed tokens; launch.sh holds the plan's layer counts."""
    from workflow_support import CLUSTER, WORKLOAD as WORKFLOW_WORKLOAD

    monkeypatch.chdir(finished_workflow)
    results = finished_workflow / "results"
    plan_path = results / "plans" / "tiny-opt" / CLUSTER / WORKFLOW_WORKLOAD / "llmpq.json"
    out = tmp_path / "llmpq-vllm"
    code = main(["export", "--config-dir", str(finished_workflow / "conf"), f"cluster={CLUSTER}",
                 f"workload={WORKFLOW_WORKLOAD}", f"plan={plan_path}", "engine=vllm", f"out={out}"])
    assert code == 0, capsys.readouterr().err
    plan = read_plan(plan_path)
    counts = ",".join(str(s.end - s.start) for s in plan.stages)
    assert f'VLLM_PP_LAYER_PARTITION="{counts}"' in (out / "launch.sh").read_text()
    quantized = (out / "quantize_config.json").is_file()
    assert quantized == any(b < 16 for b in plan.bits)
    sidecar = json.loads((results / "runs" / "tiny-opt" / CLUSTER / WORKFLOW_WORKLOAD / "llmpq.tokens.json").read_text())
    tokens, _, _ = hf_greedy(load_with_gptqmodel(out, quantized), sidecar["prompts"], len(sidecar["tokens"][0]))
    assert tokens == sidecar["tokens"]
