"""What one stage process measures: compute and wait time per phase, phase wall time, memory.

Clocks: `time.perf_counter` (monotonic). On a GPU the compute block synchronises the device before it
is read, so compute time is device time and not launch time. Memory: CUDA max allocated on a GPU; on
a CPU the bytes of the tensors the stage holds (weights, KV cache) and the process's peak RSS.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

PHASES = ("prefill", "decode")


@dataclass
class PhaseStats:
    """One stage in one phase: time computing, time blocked on communication, steps run, phase wall time (ms)."""

    compute_ms: float = 0.0
    wait_ms: float = 0.0
    steps: int = 0
    wall_ms: float = 0.0


@dataclass
class StageClock:
    """Accumulates `PhaseStats` per phase for one stage process."""

    device: torch.device
    phases: dict[str, PhaseStats] = field(default_factory=lambda: {p: PhaseStats() for p in PHASES})

    @contextmanager
    def compute(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.phases[phase].compute_ms += (time.perf_counter() - start) * 1e3
        self.phases[phase].steps += 1

    @contextmanager
    def wait(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.phases[phase].wait_ms += (time.perf_counter() - start) * 1e3

    @contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.phases[phase].wall_ms = (time.perf_counter() - start) * 1e3

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {p: asdict(s) for p, s in self.phases.items()}


@dataclass(frozen=True)
class MemoryStats:
    """Memory of one stage process (bytes)."""

    weights_bytes: int         # parameters and buffers of the stage's modules
    kv_bytes: int              # the preallocated KV cache
    peak_memory_bytes: int     # CUDA max allocated on a GPU; weights + KV on a CPU
    rss_bytes: int             # peak resident set size of the process


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (bytes; `ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_stats(device: torch.device, weights_bytes: int, kv_bytes: int) -> MemoryStats:
    """The stage's memory now that it has run."""
    held = weights_bytes + kv_bytes
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else held
    return MemoryStats(weights_bytes, kv_bytes, int(peak), peak_rss_bytes())
