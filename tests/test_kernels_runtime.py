"""The runtime loads each layer with its planned weight kernel, and refuses a kernel its device cannot run before it
loads anything. GPU-only paths (Marlin, ExLlama, Triton) are tested where CUDA is (`gpu` marker)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmpq.cli import main
from llmpq.config import compose_experiment
from llmpq.costmodel.memory import kernel_workspace_bytes
from llmpq.models.source import model_shape
from llmpq.quantize.gptq_layout import GPU_KERNELS, new_qlinear, qlinear_class
from llmpq.quantize.loader import load_quantized_layer
from llmpq.quantize.settings import LinearQuant
from llmpq.runtime.job import KernelNeeds, RunJob, StageSpec
from llmpq.runtime.kernel_check import KernelUnavailable, stage_kernel_problem
from llmpq.runtime.stage import Placement, run_stage
from llmpq.solve.plan import Plan, StageMemoryPlan, StagePlan, to_json

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only kernels)")


def plan_with(path: Path, kernels: tuple[tuple[int, str], ...], bits: tuple[int, ...]) -> Path:
    memory = StageMemoryPlan(1, 1, 1, 1, 1, 1, 0, 1 << 20)
    stage = StagePlan("cpu-large", "local", 0, 4, bits, memory, 1.0, 1.0, kernels)
    plan = Plan(method="test", model="tiny-opt", cluster="local-cpu", workload="s64-n16-b8", quant_scheme="rtn",
                quant_group_size=128, micro_batch_prefill=2, micro_batch_decode=2, stages=(stage,), prefill_s=1.0,
                decode_s=1.0, throughput_tok_s=1.0, bottleneck_stage=0, omega=0.0, ppl_increase=None, budget=None,
                latency_source="profile", omega_source="proxy", status="feasible", objective=None, gap=None,
                plan_source="baseline")
    path.write_text(to_json(plan))
    return path


def test_deploy_refuses_a_gpu_kernel_on_a_cpu_before_loading(tiny_opt_dir, tmp_path, capsys):
    """The launcher checks every stage's kernels against its device: it names the layer, bits, kernel and device and
    exits 3 before anything is loaded (the results directory has no stores at all)."""
    plan = plan_with(tmp_path / "plan.json", ((16, "fp16"), (4, "marlin")), (16, 16, 4, 4))
    out = tmp_path / "run.parquet"
    code = main(["deploy", f"model.source={tiny_opt_dir}", "workload.batch=4", "workload.name=s64-n16-b8", f"plan={plan}", f"out={out}",
                 f"results={tmp_path / 'no-stores'}"])
    err = capsys.readouterr().err
    assert code == 3 and not out.exists()
    assert ("stage 0 on device cpu-large: layer 2 (4 bits) is planned on kernel marlin, which cpu-large cannot "
            "run: marlin runs on gpu devices only") in err
    assert "no quantized store" not in err


def test_stage_process_refuses_a_kernel_its_device_cannot_run(tmp_path):
    spec = StageSpec(0, "cpu", "local", "cpu", "cpu", 1, 3, 5, (8, 4), 1, 1, 2, 1 << 30, None,
                     kernels=((8, "torch"), (4, "exllama")))
    needs = (KernelNeeds("torch", ("gpu", "cpu")), KernelNeeds("exllama", ("gpu",), 6.0))
    job = RunJob("test", str(tmp_path / "no-model"), str(tmp_path / "no-stores"), "gptq", ((1, 2),), 2, 1, 1,
                 (spec,), str(tmp_path), kernel_needs=needs)
    assert RunJob.read(job.write(tmp_path / "job.json")) == job
    with pytest.raises(KernelUnavailable, match=r"stage 0 on device cpu: layer 4 \(4 bits\) is planned on kernel "
                                                r"exllama, which cpu cannot run: exllama runs on gpu devices only"):
        run_stage(job, Placement(0, 1, 0), init_dist=False)   # before it looks for the (missing) model
    ok = StageSpec(**{**vars(spec), "kernels": ((8, "torch"), (4, "torch"))})
    assert stage_kernel_problem(ok, torch.device("cpu"), {n.name: n for n in needs}) is None


def test_loader_builds_each_kernel_by_name(tiny_opt_dir, tmp_path):
    """One code path: the torch kernel is GPTQModel's TorchLinear (the CPU kernel); the others are GPTQModel's own
    classes, which only build where their CUDA runtime exists."""
    from llmpq.quantize.run import QuantizeJob, quantize_store

    store = tmp_path / "rtn-w4"
    quantize_store(QuantizeJob("tiny-opt", tiny_opt_dir, store, "rtn", 4, 128), progress=False)
    exp = compose_experiment([f"model.source={tiny_opt_dir}"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(tiny_opt_dir))
    layer = load_quantized_layer(config, store, 1, kernels={4: "torch"})
    default = load_quantized_layer(config, store, 1)
    assert type(layer.fc1).__name__ == "TorchLinear"
    x = torch.randn(2, 5, config.hidden_size)
    pos = torch.arange(5).expand(2, 5)
    torch.testing.assert_close(layer(x, position_ids=pos)[0], default(x, position_ids=pos)[0])
    assert qlinear_class("triton").__name__ == "TritonV2Linear"     # importable everywhere
    for kernel in GPU_KERNELS:
        assert qlinear_class(kernel).__name__ in ("TritonV2Linear", "ExllamaV2Linear", "MarlinLinear")
    shape = model_shape(exp.model)
    torch_spec = exp.kernels.spec("torch")
    assert kernel_workspace_bytes(shape, exp.devices["cpu-large"], {4: torch_spec}) == 64 * 256 * 20


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel,bits", [("marlin", 4), ("marlin", 8), ("exllama", 4), ("triton", 4), ("triton", 8),
                                         ("torch", 3)])
def test_gpu_kernels_compute_what_torchlinear_computes(kernel, bits):
    """GPU only: v1 GPTQ tensors (as a layer file holds them) loaded with each GPU kernel (repacking, scratch) give
    TorchLinear's output."""
    from llmpq.quantize.gptq_layout import ExllamaScratch, exllama_scratch_bytes, finalize_qlinear

    major, minor = torch.cuda.get_device_capability()
    if kernel == "marlin" and major + minor / 10 < 7.5:
        pytest.skip("Marlin needs compute capability >= 7.5")
    torch.manual_seed(0)
    k, n = 256, 512
    q = LinearQuant(bits=bits, group_size=128)
    state = {}
    with torch.device("meta"):
        ref = new_qlinear(q, k, n, True, "torch")
    for name, t in ref.state_dict().items():
        state[name] = (torch.arange(k, dtype=torch.int32) // 128 if name == "g_idx" else
                       torch.randint(0, 2**31 - 1, t.shape, dtype=torch.int32) if t.dtype == torch.int32 else
                       (torch.rand(t.shape) * 1e-2).to(torch.float16))
    if bits in (4, 8):  # symmetric: the zero-point is the middle code (what Marlin assumes)
        state["qzeros"] = torch.full_like(state["qzeros"], int(("%x" % (2 ** (bits - 1) - 1)) * (32 // bits), 16))
    dev = torch.device("cuda")
    ref.load_state_dict({kk: v.clone() for kk, v in state.items()}, strict=True, assign=True)
    finalize_qlinear(ref, torch.float16, "torch", None, dev)
    with torch.device("meta"):
        mod = new_qlinear(q, k, n, True, kernel, torch.float16)
    mod.load_state_dict({kk: v.clone() for kk, v in state.items()}, strict=True, assign=True)
    scratch = ExllamaScratch(exllama_scratch_bytes([(k, n)]), dev) if kernel == "exllama" else None
    finalize_qlinear(mod, torch.float16, kernel, scratch, dev)
    for rows in (1, 16, 64):
        x = torch.randn(rows, k, dtype=torch.float16, device=dev)
        torch.testing.assert_close(mod(x), ref(x), rtol=2e-2, atol=2e-2)
