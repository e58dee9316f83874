"""Helpers for tests that run the Snakemake workflow in a temporary working directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = "rerun-cpu"
WORKLOAD = "s64-n16-b8"
SOLVERS = ["llmpq", "uniform"]


@dataclass(frozen=True)
class Finished:
    """A Snakemake run's exit code and its stdout + stderr."""

    returncode: int
    text: str


def snakemake(workdir: Path, *args: str, timeout: int = 1800, check: bool = True, returncode: bool = False,
              env: dict[str, str] | None = None):
    """Run Snakemake on the repository's Snakefile in `workdir`; return stdout + stderr (with the exit code as a
    `Finished` when `returncode`).

    The interpreter's bin directory goes first on PATH, so that the rules' `llmpq` is this environment's
    even when the tests run without an activated venv. `env` adds variables.
    """
    env = {**os.environ, **(env or {}),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                           str(workdir), *args], cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return Finished(proc.returncode, proc.stdout + proc.stderr) if returncode else proc.stdout + proc.stderr


def job_counts(text: str) -> dict[str, int]:
    """Jobs by rule from Snakemake's "Job stats" table ({} when nothing is to be done)."""
    if "Job stats:" not in text:
        assert "Nothing to be done" in text, text[-2000:]
        return {}
    block = text[text.index("Job stats:"):]
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}
    counts.pop("total", None)
    return counts


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Jobs a dry run would run, by rule ({} when nothing is to be done)."""
    return job_counts(snakemake(workdir, "-n", "--cores", "2", *args))


@contextmanager
def edited(path: Path, change):
    """Apply `change` (a function that edits the parsed YAML in place) to a config file, then restore it."""
    original = path.read_text()
    data = yaml.safe_load(original)
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(original)


def make_workdir(workdir: Path, tiny_opt_dir: Path) -> Path:
    """A working directory with its own conf/ (small grid, one-device cluster) and the tiny model in place."""
    shutil.copytree(ROOT / "conf", workdir / "conf")
    config_file = workdir / "conf" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["profile"].update({"batches": [1, 4, 8], "prompt_lens": [16, 64], "contexts": [16, 64, 128],
                              "repeats": 3, "min_time_ms": 10, "max_repeats": 10})
    config["eval"]["max_windows"] = 8
    config["experiments"] = [{"model": "tiny-opt", "cluster": CLUSTER, "workload": WORKLOAD, "solvers": SOLVERS}]
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    cluster = yaml.safe_load((workdir / "conf" / "cluster" / "local-cpu.yaml").read_text())
    cluster["name"] = CLUSTER
    cluster["nodes"] = [{"name": "local", "devices": {"cpu": 1}}]
    (workdir / "conf" / "cluster" / f"{CLUSTER}.yaml").write_text(yaml.safe_dump(cluster, sort_keys=False))
    shutil.copytree(tiny_opt_dir, workdir / "results" / "models" / "tiny-opt")
    return workdir
