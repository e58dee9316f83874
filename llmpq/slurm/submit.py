"""Submit a plan's batch script, stream its output while it runs, and report each component's end from sacct.

The job's state is polled every second with `scontrol show job` (slurmctld knows at once; `sbatch --wait` backs
off to half a minute between polls); its exit status is the batch script's (srun's: non-zero when any task
failed). The job is cancelled if this process is interrupted. A component that failed is named from its step's
exit code in sacct: the task that failed by itself ends with a status and no signal, while `--kill-on-bad-exit`
ends the others with a signal.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from .hetjob import SlurmJob

TERMINAL = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "TIMEOUT")
SACCT_FIELDS = "JobID,State,ExitCode,NodeList,Partition,AllocTRES"


class SubmitError(RuntimeError):
    """sbatch refused the job."""


@dataclass(frozen=True)
class ComponentEnd:
    """How one component ended (sacct): its allocation's state and node, and its step's exit code."""

    component: int
    state: str
    exit_code: str          # of the srun step: "status:signal"
    node: str
    partition: str
    tres: str

    @property
    def failed_by_itself(self) -> bool:
        """Its task exited non-zero without being killed by a signal (the others are killed after it)."""
        status, _, sig = self.exit_code.partition(":")
        return status not in ("", "0") and sig in ("", "0")


@dataclass(frozen=True)
class JobEnd:
    """The end of a submitted job: its id, the batch script's exit status and each component's end."""

    job_id: str
    returncode: int
    components: tuple[ComponentEnd, ...]

    def failed_components(self) -> list[ComponentEnd]:
        """Components whose task failed by itself; else every component that did not complete."""
        first = [c for c in self.components if c.failed_by_itself]
        return first or [c for c in self.components if c.state != "COMPLETED"]


def sacct_lines(job_id: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "-j", job_id, "-P", "-n", f"--format={SACCT_FIELDS}"], capture_output=True,
                         text=True, check=False, timeout=60)
    return [line.split("|") for line in out.stdout.splitlines() if line.count("|") == SACCT_FIELDS.count(",")]


def component_ends(job_id: str, components: int, lines: list[list[str]]) -> tuple[ComponentEnd, ...]:
    """Each component's allocation line (`ID+k`, or `ID` for a plain job) with its step 0's exit code."""
    rows = {r[0]: r for r in lines}
    out = []
    for k in range(components):
        alloc = f"{job_id}+{k}" if components > 1 else job_id
        row = rows.get(alloc)
        if row is None:
            continue
        step = rows.get(f"{alloc}.0")
        out.append(ComponentEnd(k, row[1].split()[0], step[2] if step else row[2], row[3], row[4], row[5]))
    return tuple(out)


def wait_for_accounting(job_id: str, components: int, timeout_s: float = 60) -> tuple[ComponentEnd, ...]:
    """Component ends once sacct has every component in a terminal state (it lags the job by seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ends = component_ends(job_id, components, sacct_lines(job_id))
        if len(ends) == components and all(e.state in TERMINAL for e in ends) or time.monotonic() > deadline:
            return ends
        time.sleep(1)


def _copy_new(path: Path, offset: int, out: TextIO) -> int:
    if not path.is_file():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        out.write(chunk.decode(errors="replace"))
        out.flush()
    return offset + len(chunk)


def job_state(job_id: str) -> tuple[str, int] | None:
    """(state of component 0, the batch script's exit status) from slurmctld; None once it has forgotten the job.

    A status killed by signal k is 128 + k, as a shell reports it.
    """
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=False,
                         timeout=60)
    first = out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    state = re.search(r"\bJobState=(\S+)", first)
    code = re.search(r"\bExitCode=(\d+):(\d+)", first)
    if not state or not code:
        return None
    status, sig = int(code.group(1)), int(code.group(2))
    return state.group(1), 128 + sig if sig else status


def submit_and_wait(script: Path, output: Path, components: int, out: TextIO, poll_s: float = 1.0,
                    accounting: Callable[[str, int], tuple[ComponentEnd, ...]] = wait_for_accounting) -> JobEnd:
    """sbatch `script`, copy its `output` to `out` while it runs, and return how it ended."""
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False,
                               timeout=120)
    job_id = submitted.stdout.strip().split(";")[0]
    if submitted.returncode != 0 or not job_id.isdigit():
        raise SubmitError(f"sbatch {script} failed: {(submitted.stderr or submitted.stdout).strip()}")
    print(f"llmpq slurm: submitted batch job {job_id}; its output follows ({output})", file=out, flush=True)
    offset = 0
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while True:
            offset = _copy_new(output, offset, out)
            state = job_state(job_id)
            if state is None or state[0] in TERMINAL:
                break
            time.sleep(poll_s)
    except BaseException:
        subprocess.run(["scancel", job_id], check=False)
        print(f"llmpq slurm: interrupted: cancelled job {job_id}", file=out, flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    ends = accounting(job_id, components)
    _copy_new(output, offset, out)
    if state is None:  # slurmctld forgot it (MinJobAge): failed unless sacct has every component COMPLETED
        state = ("", 0 if ends and all(e.state == "COMPLETED" for e in ends) else 1)
    return JobEnd(job_id, state[1], ends)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def describe_end(job: SlurmJob, end: JobEnd) -> list[str]:
    """Lines for the log: each component's state, node, partition and GRES; the failing component(s) named."""
    lines = [f"llmpq slurm: job {end.job_id} ({job.name}) ended with status {end.returncode}"]
    for e in end.components:
        c = job.components[e.component]
        lines.append(f"  component {e.component} [stages {','.join(map(str, c.stages))}: {'+'.join(c.devices)} on "
                     f"plan node {c.node}]: {e.state}, exit {e.exit_code}, node {e.node}, partition {e.partition}, "
                     f"{e.tres}")
    if end.returncode != 0:
        for e in end.failed_components():
            c = job.components[e.component]
            lines.append(f"llmpq slurm: failing component {e.component}: stages {','.join(map(str, c.stages))} "
                         f"({'+'.join(c.devices)} on plan node {c.node}, SLURM node {e.node}), {e.state}, "
                         f"exit {e.exit_code}")
    return lines
