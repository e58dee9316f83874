"""The first hour, timed: clone the repository, run the README's two commands exactly as written, compare with the
times the README states.

The commands are the two fenced `bash` blocks of the README's "Two commands" section (install + main job, then
install + tests); the README's stated times are read from its `<!-- newcomer: main_s=N tests_s=N -->` marker, which
the visible text repeats. The clone is of the committed HEAD (`git clone --local`), so uncommitted work is not
measured. The machine's load average before each command is recorded: timings on a shared machine are not
comparable with a quiet one.

Keys: `main_s`, `tests_s`, `readme_main_s`, `readme_tests_s`, `main_ratio`, `tests_ratio` (measured / stated),
`load_before` (1-minute load average before each command), `commit`, `cores`, `tests_summary` (pytest's last line).

Run from the repository root: `python benchmarks/newcomer.py [--keep DIR]` (about 20-30 minutes on 2 cores);
writes `benchmarks/results/newcomer.json` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "newcomer.json"
MARKER = re.compile(r"<!--\s*newcomer:\s*main_s=(\d+)\s+tests_s=(\d+)\s*-->")


def readme_commands(readme: str) -> tuple[str, str]:
    """The two bash blocks of the "Two commands" section, in order (main job, tests)."""
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    if len(blocks) < 2:
        raise ValueError("README: the 'Two commands' section needs two ```bash blocks")
    return blocks[0].strip(), blocks[1].strip()


def stated_times(readme: str) -> tuple[int, int]:
    found = MARKER.search(readme)
    if not found:
        raise ValueError("README: no <!-- newcomer: main_s=N tests_s=N --> marker")
    return int(found.group(1)), int(found.group(2))


def timed(command: str, cwd: Path, log: Path) -> tuple[float, int, str]:
    """Wall seconds, exit code and last output line of `bash -c command` in `cwd` (output kept in `log`)."""
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                              env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")})
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return time.monotonic() - started, proc.returncode, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="clone into this directory and keep it")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    readme = (ROOT / "README.md").read_text()
    main_cmd, tests_cmd = readme_commands(readme)
    readme_main, readme_tests = stated_times(readme)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp) / "llmpq"
        subprocess.run(["git", "clone", "-q", "--local", str(ROOT), str(where)], check=True)
        load = [os.getloadavg()[0]]
        main_s, main_rc, _ = timed(main_cmd, where, Path(tmp) / "main.log")
        load.append(os.getloadavg()[0])
        tests_s, tests_rc, tests_last = timed(tests_cmd, where, Path(tmp) / "tests.log")
    result = {"commit": commit, "cores": os.cpu_count(), "main_s": round(main_s, 1), "tests_s": round(tests_s, 1),
              "main_rc": main_rc, "tests_rc": tests_rc, "readme_main_s": readme_main, "readme_tests_s": readme_tests,
              "main_ratio": round(main_s / readme_main, 3), "tests_ratio": round(tests_s / readme_tests, 3),
              "load_before": [round(x, 2) for x in load], "tests_summary": tests_last}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"newcomer: main {main_s:.0f} s (README {readme_main} s, {result['main_ratio']:.2f}x, exit {main_rc}), "
          f"tests {tests_s:.0f} s (README {readme_tests} s, {result['tests_ratio']:.2f}x, exit {tests_rc}); "
          f"load {load} -> {args.out}")
    return 0 if main_rc == 0 and tests_rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
