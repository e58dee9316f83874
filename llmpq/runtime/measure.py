"""What one stage process measures: compute and wait time per phase, phase wall time, memory.

Clocks: `time.perf_counter` (monotonic). On a GPU the compute block synchronises the device before it
is read, so compute time is device time and not launch time. Memory: CUDA max allocated on a GPU; on
a CPU the bytes of the tensors the stage holds (weights, KV cache), the process's peak RSS, and the
stage's RSS growth: the peak of RSS sampled every few ms from just before the stage loads anything
until its run ends, over the RSS at that start (`RssSampler`).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
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
    rss_growth_bytes: int = 0  # peak RSS from just before loading to the end of the run, over the RSS then


MMAP_THRESHOLD_BYTES = 64 * 1024
M_MMAP_THRESHOLD = -3   # glibc mallopt parameter


def return_freed_memory() -> bool:
    """Make glibc serve allocations of 64 KiB and more with mmap (fixed threshold), so that a freed activation goes
    back to the OS: RSS then follows live memory and a stage's peak RSS is its live peak, the quantity the memory
    model predicts (with glibc's default, growing threshold, freed activations stay in the heap). False where glibc
    is not the allocator."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def prime_math_libraries(dtype: torch.dtype) -> None:
    """A few small CPU calls of what a decoder layer runs (GEMM, norm, attention, activations), so that the math
    libraries' one-time buffers (measured: 3-4 MiB of GEMM and attention workspaces) are allocated before a stage
    notes its RSS and do not count as the stage's growth."""
    with torch.inference_mode():
        linear, norm = torch.nn.Linear(64, 256).to(dtype), torch.nn.LayerNorm(64).to(dtype)
        for tokens in (1, 8):
            x = norm(torch.randn(1, tokens, 64, dtype=dtype))
            torch.relu(linear(x)), torch.nn.functional.gelu(linear(x)), torch.nn.functional.silu(linear(x))
            q = torch.randn(1, 4, tokens, 16, dtype=dtype)
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=tokens > 1).softmax(-1)


def current_rss_bytes() -> int:
    """Resident set size of this process now (bytes; /proc/self/statm on Linux, else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


class RssSampler:
    """Samples this process's RSS every `interval_s` in a background thread between `start()` and `stop()`;
    `growth_bytes` = the largest sample (and the peak RSS, when the process has not been larger before) minus
    the RSS at `start()`."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "RssSampler":
        self.baseline_bytes = self.peak_bytes = current_rss_bytes()
        self._before_max = peak_rss_bytes()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def stop(self) -> int:
        """Stop sampling; the growth in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
        high_water = peak_rss_bytes()
        if high_water > self._before_max:  # the kernel's high-water mark saw a peak between two samples
            self.peak_bytes = max(self.peak_bytes, high_water)
        return self.growth_bytes

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (bytes; `ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_stats(device: torch.device, weights_bytes: int, kv_bytes: int, rss_growth_bytes: int = 0) -> MemoryStats:
    """The stage's memory now that it has run."""
    held = weights_bytes + kv_bytes
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else held
    return MemoryStats(weights_bytes, kv_bytes, int(peak), peak_rss_bytes(), int(rss_growth_bytes))
