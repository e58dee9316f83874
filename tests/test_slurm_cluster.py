"""The live local SLURM cluster (profiles/slurm/local-cluster.sh) runs jobs and records them in sacct.

These tests need root and a running cluster; they skip with the reason otherwise.
Bring the cluster up with:  sudo profiles/slurm/local-cluster.sh install && sudo profiles/slurm/local-cluster.sh start
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TERMINAL_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}
WAIT_S = 120  # a trivial job takes a few seconds on an idle local node


def submit(workdir: Path, command: str) -> str:
    """sbatch a one-line shell command; return its job id."""
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--job-name=llmpq-test-{uuid.uuid4().hex[:8]}",
            f"--output={workdir / 'slurm-%j.out'}",
            f"--chdir={workdir}",
            "--ntasks=1",
            "--mem=100",
            "--time=2",
            f"--wrap={command}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    job_id = out.strip().split(";")[0]
    assert job_id.isdigit(), f"unexpected sbatch output: {out!r}"
    return job_id


def wait_for_end(job_id: str, timeout_s: float = WAIT_S) -> tuple[str, str]:
    """Poll sacct until the job is in a terminal state; return (State, ExitCode)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        proc = subprocess.run(
            ["sacct", "-X", "--parsable2", "--noheader", "--format=JobIdRaw,State,ExitCode", "-j", job_id],
            capture_output=True,
            text=True,
            timeout=30,
        )
        last = proc.stdout + proc.stderr
        for line in proc.stdout.splitlines():
            fields = line.split("|")
            if len(fields) == 3 and fields[0] == job_id:
                state = fields[1].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
                if state in TERMINAL_STATES:
                    return state, fields[2]
        time.sleep(1)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    queue = subprocess.run(["squeue", "-j", job_id], capture_output=True, text=True, timeout=30)
    pytest.fail(
        f"job {job_id} not finished after {timeout_s}s (cancelled now).\n"
        f"last sacct output: {last!r}\nsqueue: {queue.stdout}{queue.stderr}"
    )


def test_trivial_job_completes(slurm_cluster, tmp_path):
    job_id = submit(tmp_path, "echo hi")
    state, exit_code = wait_for_end(job_id)
    assert (state, exit_code) == ("COMPLETED", "0:0")
    assert (tmp_path / f"slurm-{job_id}.out").read_text().strip() == "hi"


def test_failing_job_is_failed_with_its_exit_code(slurm_cluster, tmp_path):
    job_id = submit(tmp_path, "echo failing; exit 3")
    state, exit_code = wait_for_end(job_id)
    assert state == "FAILED"
    assert exit_code == "3:0"  # <exit status>:<signal>
