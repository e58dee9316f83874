"""GPU kernels, measured: time per call of fp16 and of GPTQModel's Marlin, ExLlama, Triton and Torch quantized linears.

Runs only where a CUDA GPU is. For one OPT-30B linear (fc1, 7168 -> 28672, bias) and one Llama-3-70B linear
(gate_proj, 8192 -> 28672), at rows = 1 ... 1024 (rows = micro-batch x new tokens): the dense fp16 GEMM and
every (kernel, bits) the GPU runs, each module built and finalized by the runtime's own code
(`llmpq.quantize.gptq_layout`: random symmetric GPTQ tensors in the checkpoint layout, v1 -> v2 where the
kernel needs it, Marlin's repacking, ExLlama's scratch). Median of CUDA-event timings after warm-up; each
quantized kernel's output is checked against TorchLinear's at 16 rows.

Keys: `gpu`, `compute_capability`, `rows`, `ms[shape][kernel-wbits][rows]`, `ratio[shape][kernel-wbits][rows]`
(kernel / fp16), `max_rel_diff[shape][kernel-wbits]` (vs TorchLinear), `errors` (kernels that failed to build or
run, with the message). Written after every kernel, so a run cut short keeps what it measured.

Run from the repository root on a GPU machine: `python benchmarks/gpu_kernels.py`; writes
`benchmarks/results/kernels_<gpu>.json` (gpu: the lower-case model, e.g. h100) and prints a one-line summary.
The kernel model is checked against such a fixture by `tests/test_kernel_model.py` where one exists.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from llmpq.quantize.gptq_layout import ExllamaScratch, exllama_scratch_bytes, finalize_qlinear, new_qlinear
from llmpq.quantize.settings import LinearQuant

SHAPES = {"opt-30b.fc1": (7168, 28672, True), "llama-3-70b.gate_proj": (8192, 28672, False)}
ROWS = (1, 16, 32, 64, 128, 256, 512, 1024)
KERNELS = (("triton", 4), ("triton", 8), ("torch", 4), ("torch", 3), ("exllama", 4), ("marlin", 4), ("marlin", 8))  # cheap JITs first
GROUP = 128


def timed(fn, warmup: int = 3, repeats: int = 15) -> float:
    """Median ms of `fn` over `repeats` CUDA-event-timed calls after `warmup`."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)


def v1_tensors(k: int, n: int, bias: bool, bits: int, seed: int) -> dict[str, torch.Tensor]:
    """Random symmetric GPTQ tensors of one linear in the checkpoint (v1) layout: zero-points at the middle code."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: (t.shape, t.dtype) for name, t in new_qlinear(LinearQuant(bits, GROUP), k, n, bias,
                                                                         "torch").state_dict().items()}
    out = {}
    for name, (shape, dtype) in shapes.items():
        if name == "g_idx":
            out[name] = torch.arange(k, dtype=torch.int32) // GROUP
        elif name == "qzeros":
            mid = 2 ** (bits - 1) - 1                      # v1 stores zero - 1
            word = sum(mid << (bits * i) for i in range(32 // bits)) if 32 % bits == 0 else 0
            out[name] = (torch.full(shape, word, dtype=torch.int64) if word else
                         torch.randint(0, 2**31 - 1, shape, generator=gen, dtype=torch.int64)).to(torch.int32)
        elif dtype == torch.int32:
            out[name] = torch.randint(0, 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)
        else:
            out[name] = (torch.rand(shape, generator=gen) * 2e-3).to(torch.float16)
    return out


def build(kernel: str, bits: int, k: int, n: int, bias: bool, device: torch.device) -> torch.nn.Module:
    state = v1_tensors(k, n, bias, bits, seed=bits)
    with torch.device("meta"):
        module = new_qlinear(LinearQuant(bits, GROUP), k, n, bias, kernel, torch.float16)
    module.load_state_dict(state, strict=True, assign=True)
    scratch = ExllamaScratch(exllama_scratch_bytes([(k, n)]), device) if kernel == "exllama" else None
    module = finalize_qlinear(module, torch.float16, kernel, scratch, device)
    module.scratch_space = scratch
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA GPU here; nothing to measure", file=sys.stderr)
        return 0
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    stem = re.sub(r"[^a-z0-9]+", "", name.lower().replace("nvidia", "").split()[0] if name else "gpu") or "gpu"
    out = args.out or Path(f"benchmarks/results/kernels_{stem}.json")
    major, minor = torch.cuda.get_device_capability(device)
    result = {"gpu": name, "compute_capability": major + minor / 10, "rows": list(ROWS), "group_size": GROUP,
              "torch": torch.__version__, "ms": {}, "ratio": {}, "max_rel_diff": {}, "errors": {}}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

    torch.manual_seed(0)
    for shape in args.shapes:
        k, n, bias = SHAPES[shape]
        xs = {r: torch.randn(r, k, dtype=torch.float16, device=device) * 0.1 for r in ROWS}
        weight = torch.randn(n, k, dtype=torch.float16, device=device) * 0.02
        b = torch.zeros(n, dtype=torch.float16, device=device) if bias else None
        dense = {str(r): timed(lambda r=r: torch.nn.functional.linear(xs[r], weight, b)) for r in ROWS}
        result["ms"][shape] = {"fp16": dense}
        result["ratio"][shape], result["max_rel_diff"][shape] = {}, {}
        del weight
        save()
        references: dict[int, torch.Tensor] = {}
        for kernel, bits in KERNELS:
            key = f"{kernel}-w{bits}"
            started = time.monotonic()
            try:
                module = build(kernel, bits, k, n, bias, device)
                if kernel == "torch":
                    references[bits] = module(xs[16]).float()
                ms = {str(r): timed(lambda r=r: module(xs[r])) for r in ROWS}
                if bits not in references:
                    reference = build("torch", bits, k, n, bias, device)
                    references[bits] = reference(xs[16]).float()
                    del reference
                got = module(xs[16]).float()
                diff = float((got - references[bits]).abs().max() / references[bits].abs().max().clamp_min(1e-6))
            except Exception as exc:  # a kernel that cannot build or run here: record why, go on
                result["errors"][f"{shape}:{key}"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                save()
                continue
            finally:
                torch.cuda.empty_cache()
            result["ms"][shape][key] = ms
            result["ratio"][shape][key] = {r: ms[r] / dense[r] for r in ms}
            result["max_rel_diff"][shape][key] = diff
            print(f"  {shape} {key}: ratio at 1/128/1024 rows {ms['1'] / dense['1']:.2f}/{ms['128'] / dense['128']:.2f}/"
                  f"{ms['1024'] / dense['1024']:.2f}, max rel diff {diff:.1e} ({time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)
            del module
            save()
    ok = sorted({key for s in result["ratio"].values() for key in s})
    print(f"gpu_kernels: {name} (cc {major}.{minor}): measured {', '.join(ok) or 'no quantized kernel'}; "
          f"{len(result['errors'])} failed -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
