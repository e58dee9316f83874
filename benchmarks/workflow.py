"""Workflow: the README's main job from scratch, and a no-op dry run on the finished workflow.

Copies `conf/` into a fresh temporary working directory (so nothing of `results/` is reused: the tiny
model is trained, profiled, quantized, calibrated, planned, deployed and evaluated), runs
`snakemake --cores N` there and times it (`e2e_s`, with seconds per rule from Snakemake's benchmark
files under `per_rule_s`), then times `snakemake -n` on the finished workflow (`noop_dry_run_s`, target
under 5 s), which must report nothing to do.

Run from the repository root: `python benchmarks/workflow.py` (about 10 minutes on 2 cores);
writes `benchmarks/results/workflow.json` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

OUT = Path("benchmarks/results/workflow.json")
ROOT = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str) -> tuple[float, str]:
    """Run Snakemake in `workdir`; return (seconds, output). Raises with the output's tail on failure."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                           str(workdir), *args], cwd=workdir, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return seconds, proc.stdout + proc.stderr


def seconds_per_rule(workdir: Path) -> dict[str, float]:
    """Wall seconds summed per rule from the `benchmark:` files the rules write under logs/benchmarks/."""
    totals: dict[str, float] = defaultdict(float)
    for tsv in (workdir / "logs" / "benchmarks").rglob("*.tsv"):
        rule = tsv.relative_to(workdir / "logs" / "benchmarks").parts[0].removesuffix(".tsv")
        with tsv.open() as f:
            for row in csv.DictReader(f, delimiter="\t"):
                totals[rule] += float(row["s"])
    return {k: round(v, 1) for k, v in sorted(totals.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmpq-workflow-"))
    try:
        shutil.copytree(ROOT / "conf", workdir / "conf")
        shutil.copytree(ROOT / "examples", workdir / "examples")  # the default batch job's prompts file
        e2e_s, _ = snakemake(workdir, "--cores", str(args.cores))
        noop_s, text = snakemake(workdir, "-n", "--cores", str(args.cores))
        if "Nothing to be done" not in text:
            raise RuntimeError(f"the dry run after a finished workflow wants to run jobs:\n{text[-3000:]}")
        summary = sorted((workdir / "results" / "eval").rglob("summary.md"))
        result = {
            "e2e_s": round(e2e_s, 1),
            "noop_dry_run_s": round(noop_s, 2),
            "per_rule_s": seconds_per_rule(workdir),
            "summaries": {str(p.relative_to(workdir / "results" / "eval")): p.read_text() for p in summary},
            "cores": args.cores,
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        }
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"workflow: end to end {result['e2e_s']:.0f} s on {args.cores} cores, no-op dry run "
          f"{result['noop_dry_run_s']:.2f} s -> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
