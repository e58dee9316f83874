"""The batch script of a plan's SLURM job: one `#SBATCH` line per component, `hetjob` between them.

The script runs on the first node of component 0 and hands over to `python -m llmpq.slurm.batch`, which sets
the rendezvous and starts every task with one `srun`.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Sequence

from .hetjob import SlurmJob

BATCH_MODULE = "llmpq.slurm.batch"


def job_name(*parts: str) -> str:
    """A SLURM job name from its parts (rule, wildcards), joined by '.', without spaces or shell characters."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", ".".join(p for p in parts if p))


def batch_script(job: SlurmJob, stage_command: Sequence[str], output: Path, chdir: Path) -> str:
    """The script text: the job's name, output and components, then the batch entry point with the stage command."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job.name}", f"#SBATCH --output={output}", f"#SBATCH --chdir={chdir}"]
    for c in job.components:
        if c.index:
            lines.append("#SBATCH hetjob")
        lines.append(f"# {c.describe()}")
        lines.append("#SBATCH " + " ".join(c.sbatch_options(job.time_min, job.account)))
    entry = [sys.executable, "-m", BATCH_MODULE, str(len(job.components)), "--", *stage_command]
    lines.append("exec " + shlex.join(entry))
    return "\n".join(lines) + "\n"
