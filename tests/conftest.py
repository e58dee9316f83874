"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_opt_dir() -> Path:
    """The default tiny-opt model, built once per machine under `<repo>/.cache/tests/` and reused.

    A file lock makes concurrent test sessions wait for one build instead of racing.
    """
    import fcntl

    from llmpq.models.tiny import TinyOptSpec, build_tiny_opt, is_built

    spec = TinyOptSpec()
    cache = Path(__file__).resolve().parent.parent / ".cache" / "tests"
    out = cache / f"tiny-opt-{spec.digest()}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_built(out):
            build_tiny_opt(out, spec, progress=False)
    return out
