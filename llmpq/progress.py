"""Progress of long steps where a person sees it: the console Snakemake runs in, not only the job's log.

Snakemake sends a job's output to its log file, so a tqdm bar there is invisible while the workflow runs.
Each rule keeps the console's stderr open for its job as file descriptor 3 (`3>&2` before `> {log} 2>&1`) and
names it in `LLMPQ_PROGRESS_FD`. `bar(...)` is a tqdm bar (drawn into the log or the terminal, as before) that
also writes one plain line to that descriptor when it starts, every `every_s` seconds and when it ends:

    llmpq quantize tiny-opt gptq-w4: 3/4 layers (75%), 0:00:12 elapsed, ETA 0:00:04

A verb run by hand has no such variable and writes nothing more: the bar on its terminal is the progress.
A descriptor that is not open (the variable set elsewhere) disables the lines, never the step.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

from tqdm.auto import tqdm

PROGRESS_FD_ENV = "LLMPQ_PROGRESS_FD"
EVERY_S = 15.0


def clock(seconds: float) -> str:
    """h:mm:ss of a duration in seconds."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_fd(environ: dict[str, str] | None = None) -> int | None:
    """The console descriptor named by LLMPQ_PROGRESS_FD, if it is set to an open descriptor."""
    value = (os.environ if environ is None else environ).get(PROGRESS_FD_ENV, "")
    if not value.isdigit():
        return None
    try:
        os.fstat(int(value))
    except OSError:
        return None
    return int(value)


def progress_line(desc: str, done: int, total: int | None, unit: str, elapsed_s: float) -> str:
    """`llmpq <desc>: done/total unit (pct%), elapsed, ETA` (without total: the count and the elapsed time; a
    step of one: started or done)."""
    if not total:
        return f"llmpq {desc}: {done} {unit}, {clock(elapsed_s)} elapsed"
    if total == 1:
        return f"llmpq {desc}: " + ("started" if not done else f"done, {clock(elapsed_s)} elapsed")
    eta = elapsed_s / done * (total - done) if done else None
    left = clock(eta) if eta is not None else "?"
    return (f"llmpq {desc}: {done}/{total} {unit} ({100 * done / total:.0f}%), {clock(elapsed_s)} elapsed, "
            f"ETA {left}")


class ConsoleBar(tqdm):
    """A tqdm bar that also writes `progress_line`s to the console descriptor (module docstring). It keeps its own
    count, since a disabled tqdm bar counts nothing."""

    def __init__(self, *args: Any, desc: str, unit: str = "it", every_s: float = EVERY_S,
                 console_fd: int | None = None, **kwargs: Any):
        self._console, self._every_s = console_fd, every_s
        self._label, self._unit = desc, unit if unit != "it" else "steps"
        self._done, self._iterating, self._ended = int(kwargs.get("initial", 0)), False, False
        self._started = self._last = time.monotonic()
        super().__init__(*args, desc=desc, unit=unit, **kwargs)
        self._total = int(self.total) if self.total else None
        self._say()

    def _say(self, final: bool = False) -> None:
        if self._console is None:
            return
        elapsed = time.monotonic() - self._started
        if final:
            count = "" if self._total == 1 else f", {self._done} {self._unit}"
            line = f"llmpq {self._label}: done{count} in {clock(elapsed)}"
        else:
            line = progress_line(self._label, self._done, self._total, self._unit, elapsed)
        try:
            os.write(self._console, (line + "\n").encode())
        except OSError:
            self._console = None

    def _tick(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= self._every_s and not (self._total and self._done >= self._total):
            self._last = now
            self._say()

    def update(self, n: float | None = 1) -> bool | None:
        if not self._iterating:
            self._tick(int(n or 0))
        return super().update(n)

    def __iter__(self):
        self._iterating = True
        try:
            for item in super().__iter__():
                yield item
                self._tick(1)
        finally:
            self._iterating = False
            self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._say(final=True)

    def close(self) -> None:
        if hasattr(self, "_ended"):
            self._end()
        super().close()


def bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        disable: bool = False, every_s: float = EVERY_S, **kwargs: Any) -> ConsoleBar:
    """A progress bar for a long step: tqdm into the log or terminal, and console lines where a rule asked for
    them (LLMPQ_PROGRESS_FD). `disable` turns off the tqdm bar only."""
    return ConsoleBar(iterable, desc=desc, total=total, unit=unit, disable=disable, every_s=every_s,
                      console_fd=progress_fd(), **kwargs)
