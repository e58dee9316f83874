"""Progress of a batch job on the first stage's terminal: prompts done / N, tokens/s and time left.

On a terminal, a bar (tqdm) redrawn in place; in a log file, one line every `interval_s` seconds and at
the end, so that a SLURM log shows progress without carriage returns. Where a rule asked for console lines
(`llmpq.progress`), they go there too.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

from ..progress import bar as console_bar
from ..progress import clock as _clock


class Progress:
    """Counts prompts and generated tokens of this run against the job's N (some may be done already)."""

    def __init__(self, total: int, done: int = 0, stream: TextIO | None = None, interval_s: float = 30.0,
                 enabled: bool = True):
        self.total, self.done, self.tokens = total, done, 0
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr
        self.interval_s, self.enabled = interval_s, enabled
        self.last_line = self.start
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, initial=done, unit="prompt", file=self.stream, dynamic_ncols=True,
                        desc="generate") if tty else None
        self.started_with = done
        self.console = console_bar(total=total, initial=done, desc="generate", unit="prompts",
                                   disable=True) if enabled else None

    def tokens_per_s(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """prompts done / N, tokens, tok/s, ETA (from this run's prompt rate)."""
        elapsed = time.perf_counter() - self.start
        new = self.done - self.started_with
        rate = new / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        left = _clock(eta) if eta == eta else "?"
        return (f"generate: {self.done}/{self.total} prompts, {self.tokens} tokens, "
                f"{self.tokens_per_s():.1f} tok/s, ETA {left}")

    def update(self, prompts: int, tokens: int) -> None:
        self.done += prompts
        self.tokens += tokens
        if not self.enabled or not prompts:
            return
        if self.console is not None:
            self.console.update(prompts)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens_per_s():.1f} tok/s", refresh=False)
            self.bar.update(prompts)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.console is not None:
            self.console.close()
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(self.line(), file=self.stream, flush=True)
