"""An idle reference timing: one fixed piece of work, timed where a profile is taken and again where a plan runs.

The profile records its median (`reference_ms` in the profile table's metadata); every deploy stage times the
same work on the same threads just before its schedule. Their ratio, the run's load factor, says whether the
run's machine was as quiet as the profile's (`llmpq.profile.load`).

The work: `REFERENCE_CALLS` products of a `REFERENCE_SIZE`² matrix in the device's compute dtype (on a CPU in
float32, a few ms on one core; on a GPU the product is larger so that it is not launch-bound), into buffers
allocated once (so the allocator's settings, which a stage changes, do not enter), median of
`REFERENCE_REPEATS` timings (CUDA events on a GPU).
"""

from __future__ import annotations

import statistics
import time

import torch

REFERENCE_SIZE = {"cpu": 128, "cuda": 2048}
REFERENCE_CALLS = 20
REFERENCE_REPEATS = 7


def reference_ms(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Median time of the reference work on `device` (ms), on the calling thread's torch threads."""
    size = REFERENCE_SIZE["cuda" if device.type == "cuda" else "cpu"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    buffers = (torch.empty_like(a), torch.empty_like(a))
    times = []
    with torch.inference_mode():
        for r in range(REFERENCE_REPEATS + 1):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                _work(a, buffers)
                end.record()
                torch.cuda.synchronize(device)
                elapsed = float(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                _work(a, buffers)
                elapsed = (time.perf_counter() - begin) * 1e3
            if r:  # the first call warms up
                times.append(elapsed)
    return statistics.median(times)


def _work(a: torch.Tensor, buffers: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = buffers
    x.copy_(a)
    for _ in range(REFERENCE_CALLS):
        torch.mm(a, x, out=y)
        torch.tanh(y, out=x)
