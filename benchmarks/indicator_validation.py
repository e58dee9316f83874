"""Indicator validation: does Σω rank mixed-precision plans of EQUAL weight bytes by their real perplexity?

On tiny-opt (the default config's model), with the real GPTQ layers of every bit-width in the model's
`bits` (quantized here, fresh, into a temporary directory):

- `n_plans` random permutations of one fixed multiset of bit-widths over the layers (all layers have the
  same shape, so every plan has exactly the same weight bytes: counting low-bit layers cannot rank them);
  each plan's perplexity is measured with the real quantized layers on the WHOLE eval split (the plans
  differ by 0.1–2 %, and the workflow's 64-window eval ranks them only with ρ ≈ 0.9 against the whole
  split, too noisy a ground truth);
- `spearman`: Spearman ρ between each indicator's Σω and the measured perplexity (`bits_only` is constant
  on these plans, so its ρ is 0 by definition);
- `ppl_table`: perplexity of all-16/8/4/3/2, of the best and worst equal-byte plans, in float32 and
  (uniform plans) bfloat16 compute;
- `quantize_seconds_per_layer` per bit-width, `calibrate_seconds`, `total_seconds`.

Run from the repository root: `python benchmarks/indicator_validation.py` (about 4 minutes; the tiny model
is trained first if `results/models/tiny-opt` does not exist yet). Writes
`benchmarks/results/indicator_validation.json` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmpq.config import compose_experiment
from llmpq.evaluate.perplexity import EvalSpec, StoreEvaluator, eval_token_ids
from llmpq.models.source import model_dir as source_dir
from llmpq.quantize.calibration import CalibrationSpec
from llmpq.quantize.run import QuantizeJob, quantize_store
from llmpq.sensitivity.indicators import INDICATORS
from llmpq.sensitivity.run import CalibrateJob, calibrate
from llmpq.sensitivity.table import omega_sum

OUT = Path("benchmarks/results/indicator_validation.json")
N_PLANS = 30
SEED = 0


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's ρ (Pearson correlation of average ranks); 0 when either side is constant."""
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else 0.0


def equal_byte_plans(num_layers: int, low_bits: list[int], count: int, seed: int) -> list[tuple[int, ...]]:
    """`count` distinct permutations (all of them, if fewer) of the multiset cycling `low_bits` over the layers."""
    multiset = [low_bits[i % len(low_bits)] for i in range(num_layers)]
    distinct = math.factorial(num_layers)
    for b in set(multiset):
        distinct //= math.factorial(multiset.count(b))
    if distinct <= count:
        return sorted(set(itertools.permutations(multiset)))
    rng = random.Random(seed)
    plans: list[tuple[int, ...]] = []
    while len(plans) < count:
        plan = tuple(rng.sample(multiset, len(multiset)))
        if plan not in plans:
            plans.append(plan)
    return plans


def ensure_model(weights: Path | None, exp) -> Path:
    if weights is not None:
        return weights
    from llmpq.models.tiny import build_tiny_opt

    target = Path(exp.model.source)
    print(f"training {exp.model.name} into {target} first ...", file=sys.stderr)
    build_tiny_opt(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="HF directory of the model (default: the config's source)")
    parser.add_argument("--plans", type=int, default=N_PLANS)
    parser.add_argument("--max-windows", type=int, default=None,
                        help="eval windows per plan (default: the whole eval split)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: robust on a shared machine, where more threads oversubscribe)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    exp = compose_experiment([])
    weights = ensure_model(args.model_dir or source_dir(exp.model), exp)
    scheme, group_size = exp.model.quant.scheme, exp.model.quant.group_size
    calibration = CalibrationSpec.from_raw(exp.raw["calibration"])
    configured = EvalSpec.from_raw(exp.raw["eval"])
    spec = EvalSpec(configured.source, configured.window, configured.stride, args.max_windows)
    bits_list = sorted(exp.model.bits, reverse=True)
    with tempfile.TemporaryDirectory(prefix="indicator-validation-") as tmp:
        root = Path(tmp)
        quant_seconds = {}
        for bits in bits_list:
            report = quantize_store(QuantizeJob(exp.model.name, weights, root / f"{scheme}-w{bits}", scheme, bits,
                                                group_size, calibration=calibration), progress=False)
            quant_seconds[bits] = sum(r.seconds for r in report.rows) / len(report.rows)
        t0 = time.perf_counter()
        rows = calibrate(CalibrateJob(exp.model.name, weights, root, scheme, tuple(bits_list), calibration,
                                      INDICATORS), progress=False)
        calibrate_seconds = time.perf_counter() - t0
        omega = {name: {(r.layer, r.bits): r.omega for r in rows if r.indicator == name} for name in INDICATORS}
        ids = eval_token_ids(weights, spec)
        evaluator = StoreEvaluator(weights, spec, root, scheme, token_ids=ids)
        n = evaluator.num_layers

        def ppl(plan) -> float:
            return evaluator.plan(plan).perplexity

        low = [b for b in bits_list if b < 16]
        plans = equal_byte_plans(n, low, args.plans, SEED)
        measured = [ppl(p) for p in plans]
        sums = {name: [omega_sum(omega[name], p) for p in plans] for name in INDICATORS}
        rho = {name: spearman(sums[name], measured) for name in INDICATORS}
        uniform = {f"all-{b}": ppl([b] * n) for b in bits_list}
        best, worst = min(range(len(plans)), key=measured.__getitem__), max(range(len(plans)), key=measured.__getitem__)
        bf16 = StoreEvaluator(weights, spec, root, scheme, token_ids=ids, dtype=torch.bfloat16)
        uniform_bf16 = {f"all-{b}": bf16.plan([b] * n).perplexity for b in bits_list}
    result = {
        "model": exp.model.name, "scheme": scheme, "group_size": group_size, "num_layers": n,
        "eval": {"source": spec.source, "window": spec.window, "stride": spec.stride, "max_windows": spec.max_windows},
        "calibration": vars(calibration),
        "spearman": rho, "n_plans": len(plans), "bits_multiset": sorted(plans[0], reverse=True),
        "best_indicator": max((k for k in rho if k != "bits_only"), key=rho.__getitem__),
        "ppl_table": {"float32": {**uniform, "mixed-best": measured[best], "mixed-worst": measured[worst]},
                      "bfloat16": uniform_bf16},
        "mixed_plans": {"best": list(plans[best]), "worst": list(plans[worst])},
        "plans": [{"bits": list(p), "perplexity": v, "omega_sum": {k: sums[k][i] for k in INDICATORS}}
                  for i, (p, v) in enumerate(zip(plans, measured))],
        "quantize_seconds_per_layer": {str(b): s for b, s in quant_seconds.items()},
        "calibrate_seconds": calibrate_seconds,
        "total_seconds": time.perf_counter() - start,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    table = ", ".join(f"{k} {v:.2f}" for k, v in uniform.items())
    print(f"indicator_validation: n_plans={len(plans)} spearman "
          + " ".join(f"{k}={v:+.3f}" for k, v in rho.items())
          + f"; ppl {table}; {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
