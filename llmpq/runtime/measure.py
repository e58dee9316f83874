"""What one stage process measures: compute and wait time per phase, phase wall time, memory.

Clocks: `time.perf_counter` (monotonic); on a GPU every clock synchronises before it is read (`StageClock`).
Memory is measured, from just before the stage loads anything to the end of its run (`StageMemorySampler`): on a CPU the stage's RSS growth (the peak of RSS sampled every few ms over the RSS at the start,
`RssSampler`); on a GPU the CUDA allocator's peak over its allocated bytes at the start and the growth of
the device's used memory (`mem_get_info`). Beside them: the bytes of the tensors the stage holds (weights,
KV cache) and the process's peak RSS.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

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
class Lap:
    """The length of one timed block (ms), set when the block ends."""

    ms: float = 0.0


@dataclass
class StageClock:
    """Accumulates `PhaseStats` per phase for one stage process.

    Inside a phase every moment is either wait or compute: a `wait` block is the time blocked on a peer; all
    the rest is the stage's own work (its steps, sampling, posting and starting messages, the loop between
    them), counted as compute from the end of the previous block, so compute + wait = the phase's wall time.
    A wait inside a compute block (a send held back by its peer) is taken out of that block. On a GPU the
    clocks synchronise before they are read: a compute block with the device (device time, not launch time),
    a wait with the current stream (the transfer, not its launch), a phase's wall clock with the device (the
    drain).
    """

    device: torch.device
    phases: dict[str, PhaseStats] = field(default_factory=lambda: {p: PhaseStats() for p in PHASES})
    _nested_ms: float | None = field(default=None, repr=False)   # waits inside the open compute block
    _mark: float | None = field(default=None, repr=False)        # end of the last block of the open phase

    def sync(self) -> None:
        """Wait for everything queued on the device (GPU only)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _sync_stream(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @contextmanager
    def compute(self, phase: str) -> Iterator[None]:
        """One step of the stage's own work (counted in `steps`)."""
        start, outer = time.perf_counter(), self._nested_ms
        self._nested_ms = 0.0
        try:
            yield
            self.sync()
        finally:
            nested, self._nested_ms = self._nested_ms, outer
        end = time.perf_counter()
        begin = self._mark if self._mark is not None else start
        self.phases[phase].compute_ms += (end - begin) * 1e3 - nested
        self.phases[phase].steps += 1
        self._mark = end if self._mark is not None else None

    @contextmanager
    def wait(self, phase: str | None) -> Iterator[Lap]:
        """Time blocked on a peer; counted as `phase`'s wait time (not at all for None; see `add_wait`)."""
        lap, start = Lap(), time.perf_counter()
        yield lap
        self._sync_stream()
        end = time.perf_counter()
        lap.ms = (end - start) * 1e3
        if phase is not None:
            self.phases[phase].wait_ms += lap.ms
        if self._nested_ms is not None:
            self._nested_ms += lap.ms
        elif self._mark is not None and phase is not None:
            self.phases[phase].compute_ms += (start - self._mark) * 1e3
            self._mark = end

    def add_wait(self, phase: str, ms: float) -> None:
        """Count a wait timed before its phase was known."""
        self.phases[phase].wait_ms += ms

    @contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        start = self._mark = time.perf_counter()
        try:
            yield
            self.sync()
            end = time.perf_counter()
            self.phases[phase].compute_ms += (end - self._mark) * 1e3
            self.phases[phase].wall_ms = (end - start) * 1e3
        finally:
            self._mark = None

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {p: asdict(s) for p, s in self.phases.items()}


@dataclass(frozen=True)
class MemoryStats:
    """Memory of one stage process (bytes); the peaks are growth over the stage's baseline just before it loaded
    anything (what the memory model predicts)."""

    weights_bytes: int         # parameters and buffers of the stage's modules
    kv_bytes: int              # the preallocated KV cache
    peak_memory_bytes: int     # measured peak: RSS growth on a CPU, CUDA allocator peak growth on a GPU
    rss_bytes: int             # peak resident set size of the process
    rss_growth_bytes: int = 0  # peak RSS from just before loading to the end of the run, over the RSS then
    device_used_bytes: int = 0  # GPU: growth of the device's used memory (mem_get_info: allocator cache, libraries)


MMAP_THRESHOLD_BYTES = 64 * 1024          # memory mode: a freed activation goes back to the OS
FAST_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # timing mode: glibc's largest threshold; activations reuse the heap
FAST_TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024  # timing mode: the heap's free top stays mapped
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc mallopt parameters


def _glibc_call(call: Callable[[Any], bool]) -> bool:
    """`call(libc)` where the C library is glibc; False elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return bool(name) and bool(call(ctypes.CDLL(name)))
    except (OSError, AttributeError):
        return False


def _mallopt(settings: dict[int, int]) -> bool:
    return _glibc_call(lambda libc: all(libc.mallopt(k, v) for k, v in settings.items()))


def return_freed_memory() -> bool:
    """Memory mode: glibc serves allocations of 64 KiB and more with mmap (fixed threshold), so that a freed
    activation goes back to the OS; RSS then follows live memory and a stage's peak RSS is its live peak, the
    quantity the memory model predicts (with glibc's default, growing threshold, freed activations stay in the heap).
    Slow: every such allocation maps and faults in fresh pages (`benchmarks/stage_memory.py`: a prefill-sized tiny-opt
    layer call 2.2x its time in timing mode), so a CPU stage measures its memory over one untimed repetition in this mode and times the
    others in `keep_freed_memory`'s. False where glibc is not the allocator."""
    return _mallopt({M_MMAP_THRESHOLD: MMAP_THRESHOLD_BYTES})


def release_free_heap() -> bool:
    """Hand the free pages of glibc's heap back to the OS (`malloc_trim(0)`), so that an RSS read next counts live
    memory, not freed small tensors (`RssSampler`'s `trim`); False where glibc is not the allocator."""
    return _glibc_call(lambda libc: libc.malloc_trim(0) >= 0)


def keep_freed_memory() -> bool:
    """Timing mode: freed activations stay in the heap and the next step reuses them (no mapping, no page faults),
    as in a process that does not measure its memory; the profiler times in this mode too. False where glibc is not
    the allocator."""
    return _mallopt({M_MMAP_THRESHOLD: FAST_MMAP_THRESHOLD_BYTES, M_TRIM_THRESHOLD: FAST_TRIM_THRESHOLD_BYTES})


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
    the RSS at `start()`. With `trim`, every sample first hands the heap's free pages back to the OS
    (`release_free_heap`), and the kernel's high-water mark is not used (it counts free heap pages too;
    `tests/test_memory_runtime.py` shows 16 MiB of freed 4 KiB tensors kept without trimming). Slower; a CPU stage samples so in its untimed memory pass only."""

    def __init__(self, interval_s: float = 0.002, trim: bool = False):
        self.interval_s, self.trim = interval_s, trim
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> int:
        if self.trim:
            release_free_heap()
        return current_rss_bytes()

    def start(self) -> "RssSampler":
        self.baseline_bytes = self.peak_bytes = self._sample()
        self._before_max = peak_rss_bytes()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self._sample())

    def stop(self) -> int:
        """Stop sampling; the growth in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._sample())
        high_water = peak_rss_bytes()
        if not self.trim and high_water > self._before_max:  # the kernel's high-water mark saw a peak between two samples
            self.peak_bytes = max(self.peak_bytes, high_water)
        return self.growth_bytes

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (bytes; `ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class DeviceMemorySampler:
    """A GPU stage's memory: the CUDA allocator's whole peak (`torch.cuda.max_memory_allocated`, peak statistics
    reset at `start()`, just before loading: everything the process's allocator held at its peak, the libraries'
    workspaces allocated while priming included, as the memory model counts them) and the growth of the device's
    used memory from `start()` (`torch.cuda.mem_get_info`: what the allocator holds, library handles and their
    workspaces, communicator buffers)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.free_bytes = 0

    def start(self) -> "DeviceMemorySampler":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.free_bytes = torch.cuda.mem_get_info(self.device)[0]
        return self

    def stop(self) -> tuple[int, int]:
        """(allocator peak, device used growth) in bytes."""
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        used = self.free_bytes - torch.cuda.mem_get_info(self.device)[0]
        return max(0, int(peak)), max(0, int(used))


class StageMemorySampler:
    """What a stage measures of its memory from `start()` (just before loading) to `stop()` (the run's end): RSS
    growth always (`RssSampler`, `trim` passed on), and on a GPU the allocator and device figures (`DeviceMemorySampler`)."""

    def __init__(self, device: torch.device, trim: bool = False):
        self.device = device
        self.rss = RssSampler(trim=trim)
        self.gpu = DeviceMemorySampler(device) if device.type == "cuda" else None

    def start(self) -> "StageMemorySampler":
        self.rss.start()
        if self.gpu is not None:
            self.gpu.start()
        return self

    def stop(self, weights_bytes: int, kv_bytes: int) -> MemoryStats:
        rss_growth = self.rss.stop()
        peak, used = self.gpu.stop() if self.gpu is not None else (rss_growth, 0)
        return MemoryStats(weights_bytes, kv_bytes, peak, peak_rss_bytes(), rss_growth, used)
