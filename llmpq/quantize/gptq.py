"""GPTQ of a whole model with GPTQModel 7.6 on the calibration windows, saved as one GPTQ checkpoint.

GPTQModel quantizes and saves whole models only; `run.py` cuts the checkpoint into layer files. The
model is loaded in float32 for quantization (GPTQModel's CPU default, bfloat16, would round the weights
before GPTQ sees them, an error as large as an 8-bit step); sym=True, desc_act=False (the layout that
Marlin/ExLlama kernels read).
"""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .gptq_layout import gptqmodel
from .settings import LinearQuant

QUANT_LOG = "quant_log.csv"
QUANT_CONFIG = "quantize_config.json"


@dataclass(frozen=True)
class GptqRun:
    """A saved GPTQ checkpoint, the settings every linear was stored with, and where the time went."""

    checkpoint: Path
    settings: LinearQuant
    seconds: float                      # load + quantize + save, wall clock
    solve_seconds: dict[int, float]     # per decoder layer: GPTQ's own time on its linears (quant_log.csv)


def _solve_seconds(checkpoint: Path) -> dict[int, float]:
    per_layer: dict[int, float] = defaultdict(float)
    path = checkpoint / QUANT_LOG
    if path.is_file():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                per_layer[int(row["layer"])] += float(row["time"])
    return dict(per_layer)


def run_gptq(model_dir: Path, workdir: Path, bits: int, group_size: int, windows: torch.Tensor,
             sym: bool = True, desc_act: bool = False) -> GptqRun:
    """Quantize every decoder layer of `model_dir` to `bits` with GPTQ on `windows` [n, seq].

    The checkpoint goes to `workdir/checkpoint`, GPTQModel's offloaded modules to `workdir/offload`.
    """
    gptqmodel()
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    start = time.perf_counter()
    calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * len(w)} for w in windows]
    out = Path(workdir) / "checkpoint"
    config = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                            offload_to_disk_path=str(Path(workdir) / "offload"))
    model = GPTQModel.load(str(model_dir), config, device="cpu", dtype=torch.float32)
    model.quantize(calibration, batch_size=1, tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
                   backend=BACKEND.TORCH)
    model.save(str(out))
    saved = json.loads((out / QUANT_CONFIG).read_text())
    if saved.get("dynamic"):
        raise ValueError(f"{out / QUANT_CONFIG}: per-module overrides are not expected in a uniform run")
    settings = LinearQuant(bits=int(saved["bits"]), group_size=int(saved["group_size"]), sym=bool(saved["sym"]),
                           desc_act=bool(saved["desc_act"]), format=str(saved.get("format", "gptq")))
    return GptqRun(out, settings, time.perf_counter() - start, _solve_seconds(out))
