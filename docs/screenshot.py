"""Render the summary page and the Snakemake report's first page in headless Chromium, and check what they show.

Run from the repository root after the main command (`snakemake --cores 2 && snakemake --cores 2 --report
report.html`):

    python docs/screenshot.py [--results results] [--report report.html]

Writes `docs/summary.png` and `docs/report.png` and exits non-zero when the summary lacks its table or plan
figure, or when the report's first page does not point to the summary. Needs Debian's `chromium` package.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")
SUMMARY_MUST_SHOW = ("measured tok/s", "predicted tok/s", "perplexity", "is the fastest here", "data:image/png")
REPORT_MUST_SHOW = ("Summary", "measured tok/s", "is the fastest here")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    sys.exit("no Chromium found: apt-get install chromium")


def render(browser: str, page: Path, png: Path, size: str) -> str:
    """Screenshot of `page` into `png`; returns the page's DOM after its scripts ran."""
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=8000", f"--window-size={size}"]
        subprocess.run([*common, f"--screenshot={png}", page.resolve().as_uri()], check=True, capture_output=True,
                       timeout=120)
        dom = subprocess.run([*common, "--dump-dom", page.resolve().as_uri()], check=True, capture_output=True,
                             text=True, timeout=120)
    return dom.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--report", type=Path, default=Path("report.html"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    browser = chromium()
    problems = []
    summary = render(browser, args.results / "summary.html", args.out / "summary.png", "1200,1500")
    problems += [f"summary.html lacks {t!r}" for t in SUMMARY_MUST_SHOW if t not in summary]
    if args.report.is_file():
        report = render(browser, args.report, args.out / "report.png", "1400,1300")
        problems += [f"{args.report} first page lacks {t!r}" for t in REPORT_MUST_SHOW if t not in report]
    else:
        problems.append(f"{args.report}: missing (snakemake --cores 2 --report {args.report})")
    for p in problems:
        print(p, file=sys.stderr)
    print(f"screenshots in {args.out}/: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
