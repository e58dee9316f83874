"""Kernel model: predicted time of each weight kernel relative to fp16, per device, shape and rows, beside the
published figures it was fitted to and checked against.

For the A100-40G, L4, T4 and V100-32G configs and two linear shapes (OPT-30B `fc1`, 7168 -> 28672, and
Llama-3-70B `gate_proj`, 8192 -> 28672), the kernel model's (`llmpq.costmodel.roofline.linear_ms`) time of every
kernel the device runs, over the dense fp16 GEMM's, at rows = 1, 16, 32, 128, 256, 1024 (rows = micro-batch x
new tokens). The device's efficiency cancels in the ratio; compute capability decides which kernels exist.

Keys: `ratio[device][kernel][rows]` (OPT-30B fc1, 4 bits; kernel time / fp16 time),
`ratio_by_shape[shape][device][kernel][rows]` (4 bits), `ratio_by_bits[device][kernel][bits][rows]` (fc1, every
bit-width the kernel runs there), `reference` (each published point of `conf/kernels.yaml` with the model's
prediction on fc1 and the relative error of the ratio), `max_reference_rel_error`, `menus` (bits -> kernels per
device). These are predictions of the model, not measurements.

`--fit` prints the constants that `conf/kernels.yaml` marks [F], solved from the `fitted: true` points on fc1
(Marlin's bandwidth efficiency at 4 and 8 bits and its compute slowdown per rows, ExLlama's bandwidth
efficiency), instead of writing the JSON.

Run from the repository root: `python benchmarks/kernel_model.py` (a second); writes
`benchmarks/results/kernel_model.json` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from llmpq.config import QuantSpec, default_kernel_table, load_device
from llmpq.config.kernels import KernelTable, ReferencePoint
from llmpq.costmodel.kernels import kernel_menu
from llmpq.costmodel.memory import dtype_bytes
from llmpq.costmodel.roofline import LinearCost, efficiency, gemm_ms, kernel_ratio, peak_flops
from llmpq.models.shape import LinearShape, shape_from_config

OUT = Path("benchmarks/results/kernel_model.json")
DEVICES = ("a100-40g", "l4", "t4", "v100-32g")
ROWS = (1, 16, 32, 128, 256, 1024)
QUANT = QuantSpec("gptq", 128)
SHAPES = {
    "opt-30b.fc1": LinearShape("fc1", 7168, 28672, True),
    "llama-3-70b.gate_proj": LinearShape("mlp.gate_proj", 8192, 28672, False),
}
FIT_SHAPE = "opt-30b.fc1"
# the shapes' models, for the menu (alignment) check
MODEL_CONFIGS = {
    "opt-30b.fc1": {"model_type": "opt", "hidden_size": 7168, "ffn_dim": 28672, "num_hidden_layers": 48,
                    "num_attention_heads": 56, "vocab_size": 50272, "max_position_embeddings": 2048,
                    "word_embed_proj_dim": 7168, "do_layer_norm_before": True, "enable_bias": True},
    "llama-3-70b.gate_proj": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
                              "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                              "vocab_size": 128256, "max_position_embeddings": 8192},
}


def ratios(table: KernelTable, stem: str, shape_name: str, bits: int | None) -> dict[str, dict[str, float]]:
    """kernel -> {rows: kernel time / fp16 time} for the kernels the device runs at `bits` (None: each kernel's
    every bit-width, keyed kernel -> bits -> rows)."""
    device = load_device(stem)
    menu = kernel_menu(table, device, QUANT, shape_from_config(MODEL_CONFIGS[shape_name]))
    linear = SHAPES[shape_name]
    out: dict = {}
    for b, names in sorted(menu.items(), reverse=True):
        if b == 16 or (bits is not None and b != bits):
            continue
        for name in names:
            values = {str(r): float(kernel_ratio(table.spec(name), b, device, linear, QUANT, r)) for r in ROWS}
            if bits is None:
                out.setdefault(name, {})[str(b)] = values
            else:
                out[name] = values
    return out


def predicted_ratio(table: KernelTable, point: ReferencePoint) -> float:
    device = load_device(point.device)
    return float(kernel_ratio(table.spec(point.kernel), point.bits, device, SHAPES[FIT_SHAPE], QUANT, point.rows))


def reference_rows(table: KernelTable) -> list[dict]:
    out = []
    for p in table.reference:
        pred = predicted_ratio(table, p)
        out.append({"kernel": p.kernel, "bits": p.bits, "device": p.device, "rows": p.rows, "speedup": p.speedup,
                    "ratio": p.ratio, "predicted_ratio": pred, "predicted_speedup": 1.0 / pred,
                    "rel_error": abs(pred - p.ratio) / p.ratio, "fitted": p.fitted, "source": p.source})
    return out


def fit(table: KernelTable) -> dict:
    """The [F] constants from the `fitted: true` points on fc1 (module docstring).

    Bandwidth efficiency e at a memory-bound point: (Wq / e + act) / BW = ratio · t_fp16, so
    e = Wq / (ratio · t_fp16 · BW − act). Compute slowdown s at a compute-bound point: 2·rows·K·N·s / P =
    ratio · t_fp16, so s = ratio · t_fp16 · P / (2·rows·K·N); below the first fitted rows it is held.
    """
    linear = SHAPES[FIT_SHAPE]
    out: dict = {"bandwidth_efficiency": {}, "compute_slowdown": {}}
    for p in (p for p in table.reference if p.fitted):
        device = load_device(p.device)
        d = dtype_bytes(device)
        eta = efficiency(device, "decode")
        bw, peak = device.mem_bandwidth_gbps * 1e9 * eta, peak_flops(device) * eta
        cost = LinearCost.of(linear, p.bits, QUANT, device)
        dense = gemm_ms(device, "decode", LinearCost.of(linear, 16, QUANT, device), p.rows, d) / 1e3
        target = p.ratio * dense
        act = d * p.rows * (cost.k + cost.n)
        flops = 2.0 * p.rows * cost.k * cost.n
        memory_bound = p.rows <= 16 or p.kernel != "marlin"
        if memory_bound:
            out["bandwidth_efficiency"].setdefault(p.kernel, {})[p.bits] = round(cost.packed_bytes / (target * bw - act), 4)
        else:
            out["compute_slowdown"].setdefault(p.kernel, {})[p.rows] = round(target * peak / flops, 4)
    return out


def against_measured(table: KernelTable, fixture: Path) -> dict:
    """The model beside a GPU's measured ratios (`benchmarks/gpu_kernels.py`, file `kernels_<device stem>.json`):
    per shape, kernel-wbits and rows, the measured and predicted ratio, and whether both put the kernel on the same
    side of fp16 (faster or slower)."""
    measured = json.loads(fixture.read_text())
    stem = fixture.stem.removeprefix("kernels_")
    device = load_device(stem)
    out: dict = {"gpu": measured["gpu"], "device": stem, "points": []}
    for shape_name, kernels in measured["ratio"].items():
        for key, by_rows in kernels.items():
            name, bits = key.rsplit("-w", 1)
            for rows, got in sorted(by_rows.items(), key=lambda kv: int(kv[0])):
                model = float(kernel_ratio(table.spec(name), int(bits), device, SHAPES[shape_name], QUANT, int(rows)))
                out["points"].append({"shape": shape_name, "kernel": name, "bits": int(bits), "rows": int(rows),
                                      "measured": got, "predicted": model, "same_side": (got < 1) == (model < 1)})
    points = out["points"]
    out["same_side_share"] = sum(p["same_side"] for p in points) / len(points) if points else None
    out["median_abs_log_error"] = sorted(abs(math.log(p["predicted"] / p["measured"])) for p in points)[
        len(points) // 2] if points else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--fit", action="store_true", help="print the fitted constants instead")
    args = parser.parse_args(argv)
    table = default_kernel_table()
    if args.fit:
        print(json.dumps(fit(table), indent=2))
        return 0
    reference = reference_rows(table)
    result = {
        "note": "predictions of the kernel model (conf/kernels.yaml), not measurements; ratio = kernel time / fp16 time",
        "rows": list(ROWS),
        "shapes": {k: [v.in_features, v.out_features] for k, v in SHAPES.items()},
        "ratio": {stem: ratios(table, stem, FIT_SHAPE, 4) for stem in DEVICES},
        "ratio_by_shape": {name: {stem: ratios(table, stem, name, 4) for stem in DEVICES} for name in SHAPES},
        "ratio_by_bits": {stem: ratios(table, stem, FIT_SHAPE, None) for stem in DEVICES},
        "menus": {stem: {str(b): list(k) for b, k in kernel_menu(
            table, load_device(stem), QUANT, shape_from_config(MODEL_CONFIGS[FIT_SHAPE])).items()} for stem in DEVICES},
        "reference": reference,
        "max_reference_rel_error": max(r["rel_error"] for r in reference),
        "measured": [against_measured(table, f) for f in sorted(OUT.parent.glob("kernels_*.json"))],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    a100 = result["ratio"]["a100-40g"]["marlin"]
    print(f"kernel_model: {len(reference)} published points, max |error| {100 * result['max_reference_rel_error']:.1f}% "
          f"of the ratio; A100 Marlin W4 / fp16 at rows 1/128/1024: {a100['1']:.2f}/{a100['128']:.2f}/{a100['1024']:.2f} "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
