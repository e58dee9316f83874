"""Stage memory and allocator effects on this machine: the figures behind the runtime's memory measurement.

Each part runs in a fresh process (allocator and library settings are per process), on tiny-opt's checkpoint and
16-bit store from the workflow's results (run `snakemake --cores 2` first):

- `allocator`: a 16-bit tiny-opt layer's prefill call (b = 4, 64 tokens) and decode call (b = 4, context 70), in
  the timing mode (`keep_freed_memory`) and in the memory mode (`return_freed_memory`): the memory mode's slowdown.
- `mapped`: RSS kept by the token embedding (128 KiB) read with safetensors, left mapped onto the file and copied
  out of it (`llmpq.quantize.checkpoint.owned_copy`); trimmed RSS, KiB.
- `mkl`: RSS a last stage of two 16-bit layers keeps after its warm-up (all step shapes of s64-n16-b8 at b_p 2,
  b_d 4), with MKL's fast memory manager on and off (`llmpq.runtime.job.STAGE_ENV`), and the prefill layer call's
  time in each.
- `gloo`: RSS each of two gloo ranks keeps after their first round of 4 messages of 32 KiB in flight and a barrier
  (beyond a 1-element start-up exchange), and after the same round once more (`llmpq.runtime.comm.Ring.prime`).

Writes `benchmarks/results/stage_memory.json` and prints a summary. About a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path("benchmarks/results/stage_memory.json")
MODEL = Path("results/models/tiny-opt")
STORE = Path("results/quantized/tiny-opt")


def _rss_kib() -> float:
    import ctypes
    import gc

    from llmpq.runtime.measure import current_rss_bytes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return current_rss_bytes() / 1024


def _median_ms(fn, seconds: float = 1.5) -> float:
    import statistics
    import time

    for _ in range(5):
        fn()
    times, end = [], time.time() + seconds
    while time.time() < end:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _layer_calls() -> dict:
    import torch

    from llmpq.profile.timing import build_parts, layer_call

    config = json.loads((MODEL / "config.json").read_text())
    parts = build_parts(config, torch.device("cpu"), torch.float32)
    cpu = torch.device("cpu")
    return {"prefill": layer_call(parts, parts.layer, 4, 64, 64, cpu, torch.float32),
            "decode": layer_call(parts, parts.layer, 4, 1, 70, cpu, torch.float32)}


def part_allocator(mode: str) -> dict:
    import torch

    from llmpq.runtime.measure import keep_freed_memory, return_freed_memory

    torch.set_num_threads(1)
    (return_freed_memory if mode == "memory" else keep_freed_memory)()
    with torch.inference_mode():
        return {phase: _median_ms(call) for phase, call in _layer_calls().items()}


def part_mapped() -> dict:
    from safetensors import safe_open

    from llmpq.quantize.checkpoint import owned_copy

    key = "model.decoder.embed_tokens.weight"
    with safe_open(str(MODEL / "model.safetensors"), "pt") as f:  # the library's one-time state, not counted
        owned_copy(f.get_tensor(key))
    out = {}
    for how in ("mapped", "owned"):
        before = _rss_kib()
        with safe_open(str(MODEL / "model.safetensors"), "pt") as f:
            tensor = f.get_tensor(key) if how == "mapped" else owned_copy(f.get_tensor(key))
        out[f"{how}_kib"] = _rss_kib() - before
        out["tensor_kib"] = tensor.numel() * tensor.element_size() / 1024
        del tensor
    return out


def part_mkl() -> dict:
    import torch

    from llmpq.runtime.kvcache import StageKVCache, cache_shape
    from llmpq.runtime.measure import StageClock, keep_freed_memory, prime_math_libraries
    from llmpq.runtime.parts import load_stage
    from llmpq.runtime.schedule import StageRunner, plan_steps, prime_stage

    torch.set_num_threads(1)
    keep_freed_memory()
    cpu, dtype = torch.device("cpu"), torch.float32
    kernels = {16: "fp16"}
    prime_math_libraries(dtype)
    with torch.inference_mode():
        prime_stage(load_stage(MODEL, STORE, "gptq", 2, [16], first=False, last=True, device=cpu, dtype=dtype,
                               kernels=kernels), cpu, dtype)
        model = load_stage(MODEL, STORE, "gptq", 2, [16, 16], first=False, last=True, device=cpu, dtype=dtype,
                           kernels=kernels)
        cache = StageKVCache(cache_shape(model.config, 2, 2, 8, 80), dtype, cpu)
        before = _rss_kib()
        StageRunner(model, cache, StageClock(cpu), 8, 16).warm_up(plan_steps(8, 64, 16, 2, 4))
        kept = _rss_kib() - before
        return {"warmup_kept_kib": kept, "prefill_layer_ms": _median_ms(_layer_calls()["prefill"])}


def part_gloo() -> dict:
    """Run by torchrun on two ranks; rank 0 prints the JSON."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group([0, 1])
    one = torch.zeros(1, dtype=torch.long)
    if rank == 0:
        dist.isend(one, 1, tag=1, group=group).wait()
    else:
        dist.irecv(one, 0, tag=1, group=group).wait()

    def one_round(tag: int) -> float:
        before = _rss_kib()
        works = []
        for i in range(4):
            t = torch.ones(2, 64, 64)
            works.append(dist.isend(t, 1, tag=tag + i, group=group) if rank == 0 else
                         dist.irecv(t, 0, tag=tag + i, group=group))
        for w in works:
            w.wait()
        dist.barrier()
        return _rss_kib() - before

    first, second = one_round(100), one_round(200)
    gathered = [None, None]
    dist.all_gather_object(gathered, {"first_round_kib": first, "second_round_kib": second})
    if rank == 0:
        print(json.dumps({"sender": gathered[0], "receiver": gathered[1]}))
    dist.destroy_process_group()
    return {}


def _fresh(args: list[str], env: dict[str, str | None] | None = None, torchrun: bool = False) -> dict:
    """Run a part in a fresh process (`env`: variables to set, or to remove where None); its JSON line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun \
        else [sys.executable]
    child = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    child = {k: v for k, v in child.items() if v is not None}
    done = subprocess.run([*cmd, __file__, *args], env=child, capture_output=True, text=True, check=True)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["allocator", "mapped", "mkl", "gloo"])
    parser.add_argument("--mode", default="timing")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.part:
        run = {"allocator": lambda: part_allocator(args.mode), "mapped": part_mapped, "mkl": part_mkl,
               "gloo": part_gloo}[args.part]
        result = run()
        if result:
            print(json.dumps(result))
        return 0
    if not (MODEL / "model.safetensors").is_file() or not (STORE / "gptq-w16").is_dir():
        print(f"needs {MODEL} and {STORE}/gptq-w16: run `snakemake --cores 2` first", file=sys.stderr)
        return 2
    allocator = {mode: _fresh(["--part", "allocator", "--mode", mode]) for mode in ("timing", "memory")}
    record = {
        "allocator_ms": allocator,
        "memory_mode_slowdown": {p: allocator["memory"][p] / allocator["timing"][p] for p in ("prefill", "decode")},
        "mapped": _fresh(["--part", "mapped"]),
        "mkl": {"fast_mm_on": _fresh(["--part", "mkl"], {"MKL_DISABLE_FAST_MM": None}),
                "fast_mm_off": _fresh(["--part", "mkl"], {"MKL_DISABLE_FAST_MM": "1"})},
        "gloo": _fresh(["--part", "gloo"], torchrun=True),
        "cores": os.cpu_count(), "load_average": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    slow, mk, gl = record["memory_mode_slowdown"], record["mkl"], record["gloo"]
    print(f"stage memory: memory mode x{slow['prefill']:.2f} prefill, x{slow['decode']:.2f} decode; "
          f"embedding {record['mapped']['tensor_kib']:.0f} KiB keeps {record['mapped']['mapped_kib']:.0f} KiB mapped, "
          f"{record['mapped']['owned_kib']:.0f} KiB copied; MKL fast MM keeps {mk['fast_mm_on']['warmup_kept_kib']:.0f} "
          f"KiB after warm-up ({mk['fast_mm_off']['warmup_kept_kib']:.0f} off; prefill layer "
          f"{mk['fast_mm_on']['prefill_layer_ms']:.3f} vs {mk['fast_mm_off']['prefill_layer_ms']:.3f} ms); gloo first "
          f"round keeps {gl['sender']['first_round_kib']:.0f}/{gl['receiver']['first_round_kib']:.0f} KiB "
          f"(sender/receiver), second {gl['sender']['second_round_kib']:.0f}/{gl['receiver']['second_round_kib']:.0f} "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
