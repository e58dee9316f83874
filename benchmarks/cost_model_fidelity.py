"""Cost-model fidelity: per-layer latency predicted from a profile grid vs measured off the grid, and memory.

One OPT-style decoder layer large enough not to be dispatch-bound (hidden 1024, FFN 4096, 16 heads) runs
on one CPU thread (device config `cpu`). For each bit-width (16 = dense fp32; 8/4 = GPTQModel
TorchLinear with random codes), grid and held-out points are timed together in interleaved passes
(`measure_interleaved`: every pass visits every point once, so the load of a shared machine falls on
both alike); the latency model is fitted on the grid only and predicts the held-out points, which lie
off the grid in batch and/or length (batch 1 included).

- `prefill_mape`, `decode_mape`: mean |predicted − measured| / measured over the held-out points, all
  bit-widths; per bit-width under `by_bits`.
- `memory_rel_error`: the largest |predicted − allocated| / allocated over the built layer's parameter and
  buffer bytes (per bit-width) and the allocated KV cache of the held-out decode points.

Run from the repository root: `python benchmarks/cost_model_fidelity.py` (about 3–4 minutes);
writes `benchmarks/results/cost_model_fidelity.json` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from llmpq.artifacts import schema
from llmpq.config import QuantSpec, load_device
from llmpq.costmodel.latency import LatencyModel, fit_profile
from llmpq.costmodel.memory import layer_kv_bytes, layer_weight_bytes
from llmpq.models.shape import shape_from_config
from llmpq.profile.timing import (
    CLOCKS,
    PreallocatedKV,
    build_parts,
    layer_call,
    measure_interleaved,
    module_bytes,
    quantize_randomly,
    torch_threads,
)

LAYER = {"model_type": "opt", "hidden_size": 1024, "ffn_dim": 4096, "num_hidden_layers": 1,
         "num_attention_heads": 16, "vocab_size": 1024, "max_position_embeddings": 2048,
         "word_embed_proj_dim": 1024, "do_layer_norm_before": True, "enable_bias": True}
GRID_BATCHES = (1, 2, 4, 8)
GRID_PROMPTS = (16, 32, 64, 128)
GRID_CONTEXTS = (32, 64, 128, 256, 512)
HELD_PREFILL = ((1, 24), (1, 96), (2, 40), (3, 48), (3, 100), (5, 112), (6, 24), (6, 80), (7, 56))
HELD_DECODE = ((1, 48), (1, 200), (1, 400), (2, 240), (3, 96), (3, 300), (5, 80), (6, 160), (6, 450), (7, 384))
OUT = Path("benchmarks/results/cost_model_fidelity.json")


def _points(held: bool) -> list[tuple[str, int, int, int]]:
    """(phase, batch, q_tokens, context_len) of the grid or of the held-out set."""
    if held:
        return [("prefill", b, s, s) for b, s in HELD_PREFILL] + [("decode", b, 1, c) for b, c in HELD_DECODE]
    return ([("prefill", b, s, s) for b in GRID_BATCHES for s in GRID_PROMPTS]
            + [("decode", b, 1, c) for b in GRID_BATCHES for c in GRID_CONTEXTS])


def _mape(rows: list[dict]) -> float:
    return float(np.mean([abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows]))


def run(bits: tuple[int, ...], warmup: int, repeats: int, min_time_ms: float, max_repeats: int, seed: int,
        clock: str) -> dict:
    device = load_device("cpu")
    quant = QuantSpec("gptq", 128)
    shape = shape_from_config(LAYER)
    dev, dtype = torch.device("cpu"), torch.float32
    grid_rows, held_rows, memory = [], [], []
    points = [(False, p) for p in _points(False)] + [(True, p) for p in _points(True)]
    with torch_threads(device.threads):
        parts = build_parts(LAYER, dev, dtype, ends=False)
        for b_ in bits:
            layer = quantize_randomly(parts.layer, b_, quant.group_size, dev)
            predicted_w, built_w = layer_weight_bytes(shape, b_, quant, device), module_bytes(layer)
            memory.append({"what": f"layer weights, {b_} bits", "predicted_bytes": predicted_w, "allocated_bytes": built_w})
            makers = [partial(layer_call, parts, layer, batch, q, c, dev, dtype) for _, (_, batch, q, c) in points]
            timings = measure_interleaved(makers, warmup=warmup, repeats=repeats, min_time_ms=min_time_ms,
                                          max_repeats=max_repeats, device=dev, seed=seed + b_, clock=clock)
            for (held, (phase, batch, q, c)), t in zip(points, timings):
                row = {"bits": b_, "phase": phase, "batch": batch, "q_tokens": q, "context_len": c}
                if held:
                    held_rows.append({**row, "measured_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
                                      "samples": t.repeats})
                else:
                    grid_rows.append({**row, "device": "cpu", "model": "fidelity", "component": "layer",
                                      "kernel": "fp16" if b_ == 16 else "torch",
                                      "latency_ms": t.median_ms, "latency_ms_p10": t.p10_ms,
                                      "latency_ms_p90": t.p90_ms, "repeats": t.repeats})
            del layer, makers
        for batch, c in HELD_DECODE:
            kv = PreallocatedKV(batch, parts.kv_heads, c, parts.head_dim, dtype, dev)
            memory.append({"what": f"KV cache, {batch} x {c}", "predicted_bytes": layer_kv_bytes(shape, batch, c, device),
                           "allocated_bytes": kv.nbytes})
    fits = fit_profile(pa.Table.from_pylist(grid_rows, schema=schema("profile")), "fidelity grid")
    model = LatencyModel(shape=shape, devices={"cpu": device}, quant=quant, fits={"cpu": fits})
    for r in held_rows:
        r["predicted_ms"] = model.layer_ms("cpu", r["bits"], r["phase"], r["batch"], r["q_tokens"], r["context_len"])
    for m in memory:
        m["rel_error"] = abs(m["predicted_bytes"] - m["allocated_bytes"]) / m["allocated_bytes"]
    by_bits = {str(b_): {p + "_mape": _mape([r for r in held_rows if r["bits"] == b_ and r["phase"] == p])
                         for p in ("prefill", "decode")} for b_ in bits}
    return {
        "prefill_mape": _mape([r for r in held_rows if r["phase"] == "prefill"]),
        "decode_mape": _mape([r for r in held_rows if r["phase"] == "decode"]),
        "by_bits": by_bits,
        "memory_rel_error": max(m["rel_error"] for m in memory),
        "layer": LAYER,
        "grid": {"batches": GRID_BATCHES, "prompt_lens": GRID_PROMPTS, "contexts": GRID_CONTEXTS},
        "held_out": held_rows,
        "memory": memory,
        "settings": {"bits": list(bits), "warmup": warmup, "repeats": repeats, "min_time_ms": min_time_ms,
                     "max_repeats": max_repeats, "clock": clock, "threads": device.threads,
                     "quant": {"scheme": quant.scheme, "group_size": quant.group_size}, "seed": seed},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per point, at least")
    parser.add_argument("--min-time-ms", type=float, default=600.0, help="timed ms per point, at least")
    parser.add_argument("--max-repeats", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="wall: monotonic wall clock; thread_cpu: CPU time of the timing thread (ignores "
                             "time the OS gives other processes on a shared machine)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    start, load_before = time.perf_counter(), os.getloadavg()
    result = run(tuple(args.bits), args.warmup, args.repeats, args.min_time_ms, args.max_repeats, args.seed, args.clock)
    result["runtime_s"] = time.perf_counter() - start
    result["machine"] = {"loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                         "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    by = " ".join(f"{b}b {v['prefill_mape']:.1%}/{v['decode_mape']:.1%}" for b, v in result["by_bits"].items())
    print(f"cost_model_fidelity ({args.clock} clock): prefill_mape {result['prefill_mape']:.1%} decode_mape {result['decode_mape']:.1%} "
          f"(prefill/decode by bits: {by}) memory_rel_error {result['memory_rel_error']:.2%} "
          f"in {result['runtime_s']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
