"""Per-step costs of a pipeline stage that timing a layer alone does not see, measured on one device.

- `loop` (per phase and micro-batch): the stage loop's own cost per step, what a stage pays besides its layers'
  calls, the embedding and the head as the profiler times them (`layer_call`, `embed_call`, `head_call`): the
  runtime's step bookkeeping (clock, inputs, positions and masks, the KV cache view, greedy sampling, storing
  the token). Measured as the runtime's one-stage schedule (`StageRunner`, warm-up included) over a one-layer
  stage of the model, per step, minus the same step's parts timed back to back, both medians; clamped at 0.
- `layer_hot` / `layer_idle` (per phase, at the grid's corners, 16-bit): a layer call right after another
  call, and right after an idle gap of `IDLE_GAP_MS`, as a pipeline stage makes it after waiting for its
  input (caches and clocks cool while it waits). Their difference is the cost model's after-idle cost, added
  to each layer of every stage of a multi-stage pipeline (an added time: a slow quantized layer refills the same
  caches; as a factor it over-predicted a 3-bit stage's decode by 23%). The gap matters: the slowdown grows with it
  (`benchmarks/idle_gap.py`), and 2 ms is the wait the default two-stage plans' stages make per step
  (1-2.5 ms); a gap as long as one call (the earlier choice) left two-stage decode 26-38% optimistic.

The cost model reads both from the profile (`llmpq.costmodel.latency.LatencyModel.loop_ms` and `.after_idle_ms`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..runtime.kvcache import StageKVCache, cache_shape
from ..runtime.measure import StageClock
from ..runtime.parts import whole_model_stage
from ..runtime.schedule import StageRunner, plan_steps
from .timing import (ModelParts, Timing, _summary, _timer, embed_call, head_call, layer_call, materialize, measure,
                     one_layer_model)

LOOP_ROUNDS = 5          # decode rounds of the stage-loop measurement (contexts s0 + 1 .. s0 + 4)
IDLE_GAP_MS = 2.0       # a pipeline stage's typical wait for its input (module docstring)


@dataclass(frozen=True)
class LoopPoint:
    """The stage loop's cost per step at one (phase, batch) point, with the step and its parts (ms)."""

    phase: str
    batch: int
    q_tokens: int
    context_len: int
    loop: Timing
    step_ms: float
    parts_ms: float


def loop_points(hf_config: Mapping[str, Any], parts: ModelParts, batches: Sequence[int], prompt_len: int,
                device: torch.device, dtype: torch.dtype, repeats: int, warmup: int) -> list[LoopPoint]:
    """The `loop` cost per phase and batch (module docstring): prefill of `prompt_len` tokens, decode at context
    `prompt_len` + 2 (the middle of `LOOP_ROUNDS` − 1 rounds)."""
    model = materialize(one_layer_model(hf_config), device, dtype)
    stage = whole_model_stage(model, device, dtype)
    mid = prompt_len + (LOOP_ROUNDS - 1) // 2 + 1
    out = []
    with torch.inference_mode():
        for b in batches:
            cache = StageKVCache(cache_shape(model.config, 0, 1, b, prompt_len + LOOP_ROUNDS), dtype, device)
            steps = plan_steps(b, prompt_len, LOOP_ROUNDS, b, b)
            prompts = torch.randint(0, parts.vocab, (b, prompt_len), device=device)
            runner = StageRunner(stage, cache, StageClock(device), b, LOOP_ROUNDS)
            _, clocks = runner.run(prompts, steps, warmup=True, repeats=max(repeats, 3))
            for phase, q, c in (("prefill", prompt_len, prompt_len), ("decode", 1, mid)):
                step_ms = statistics.median(r[phase]["compute_ms"] / r[phase]["steps"] for r in clocks)
                chain = _parts_chain(parts, b, q, c, device, dtype)
                parts_ms = measure(chain, warmup=warmup, repeats=max(repeats, 3), device=device).median_ms
                loop = max(0.0, step_ms - parts_ms)
                out.append(LoopPoint(phase, b, q, c, Timing(loop, loop, loop, len(clocks)), step_ms, parts_ms))
    return out


def _parts_chain(parts: ModelParts, batch: int, q: int, context: int, device: torch.device,
                 dtype: torch.dtype) -> Callable[[], Any]:
    """The profiled parts of one step, back to back: embedding of q tokens, the layer over `context`, the head."""
    embed = embed_call(parts, batch, q, device)
    layer = layer_call(parts, parts.layer, batch, q, context, device, dtype)
    head = head_call(parts, batch, device, dtype)

    def run() -> None:
        embed()
        layer()
        head()
    return run


def hot_and_idle(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> tuple[Timing, Timing]:
    """A call right after another (`hot`) and right after an idle gap of `IDLE_GAP_MS` (`idle`), `repeats` pairs,
    medians (ms)."""
    timer = _timer(device, "wall")
    hot, idle = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            hot.extend(timer(fn, 1))
            time.sleep(IDLE_GAP_MS / 1e3)
            idle.extend(timer(fn, 1))
    return _summary(hot), _summary(idle)
