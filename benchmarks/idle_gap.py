"""Idle gap: how much slower one decoder-layer call of tiny-opt is right after an idle gap than right after another
call, per gap length, on one CPU thread; the measurement behind the profiler's 2 ms after-idle gap
(`llmpq.profile.stage_loop.IDLE_GAP_MS`).

Two call shapes of the default workload: decode (b = 4, one new token over 80 keys) and prefill (b = 4, 64 new
tokens). For each gap, `--repeats` pairs (a call right after another, then a sleep of the gap, then the timed
call); `ratio` = median after the gap / median back to back. Keys: `gaps_ms`, `shapes` ({shape: {gap: ratio}}),
`hot_ms` ({shape: ms}), `load_average`.

Run from the repository root: `python benchmarks/idle_gap.py` (about a minute); writes
`benchmarks/results/idle_gap.json` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from llmpq.config import compose_experiment
from llmpq.models.source import hf_config_dict
from llmpq.profile.timing import build_parts, layer_call, torch_threads

OUT = Path("benchmarks/results/idle_gap.json")
GAPS_MS = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 50.0)
SHAPES = {"decode": (4, 1, 80), "prefill": (4, 64, 64)}   # batch, new tokens, keys


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device, dtype = torch.device("cpu"), torch.float32
    parts = build_parts(hf_config_dict(compose_experiment(["model=tiny-opt"]).model), device, dtype, ends=False)
    ratios: dict[str, dict[str, float]] = {}
    hot_ms: dict[str, float] = {}
    with torch_threads(1), torch.inference_mode():
        for shape, (batch, q, keys) in SHAPES.items():
            call = layer_call(parts, parts.layer, batch, q, keys, device, dtype)
            for _ in range(20):
                call()
            hot, after = [], {gap: [] for gap in GAPS_MS}
            for _ in range(args.repeats):
                for gap in GAPS_MS:
                    call()
                    hot.append(timed_ms(call))
                    time.sleep(gap / 1e3)
                    after[gap].append(timed_ms(call))
            hot_ms[shape] = statistics.median(hot)
            ratios[shape] = {str(g): statistics.median(v) / hot_ms[shape] for g, v in after.items()}
    result = {"gaps_ms": list(GAPS_MS), "shapes": ratios, "hot_ms": hot_ms, "repeats": args.repeats,
              "load_average": round(os.getloadavg()[0], 2), "cores": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    line = "; ".join(f"{s}: " + ", ".join(f"{g:g} ms x{r:.2f}" for g, r in zip(GAPS_MS, ratios[s].values()))
                     for s in ratios)
    print(f"idle_gap: {line} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
