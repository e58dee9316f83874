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


def test_two_nodes_with_their_own_gpu_type_and_partition(slurm_cluster):
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P %G %T"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    rows = sorted(tuple(line.split()) for line in out.splitlines())
    assert [(p.rstrip("*"), g) for p, g, _ in rows] == [("local", "gpu:typea:2"), ("local2", "gpu:typeb:2")]
    assert all(state in ("idle", "mixed", "allocated") for _, _, state in rows), rows


def test_a_submission_that_sbatch_refuses_is_a_deploy_error(slurm_cluster, tiny_opt_dir, tmp_path):
    """A site's device names a partition the cluster does not have: deploy fails at once, naming sbatch's error."""
    import sys

    from llmpq.costmodel.memory import StageMemory
    from llmpq.solve.plan import Plan, StagePlan, to_json

    root = Path(__file__).resolve().parents[1]
    text = (root / "conf" / "device" / "cpu-typeb.yaml").read_text()
    (tmp_path / "site" / "device").mkdir(parents=True)
    (tmp_path / "site" / "device" / "cpu-typeb.yaml").write_text(text.replace("partition: local2", "partition: nosuch"))
    memory = StageMemory(10**6, 10**5, 10**5, 0, 0, 0, 0, 1 << 30)
    stages = tuple(StagePlan(d, n, 2 * j, 2 * j + 2, (16, 16), memory, 1.0, 1.0)
                   for j, (d, n) in enumerate((("cpu-typea", "n0"), ("cpu-typeb", "n1"))))
    plan = tmp_path / "plan.json"
    plan.write_text(to_json(Plan("test", "tiny-opt", "local-2node", "s64-n16-b8", "gptq", 128, 2, 2, stages, 0.01, 0.01,
                                 1.0, 0, 0.0, None, None, "profile", "proxy", "feasible", None, None, "baseline")))
    proc = subprocess.run([sys.executable, "-m", "llmpq.cli", "deploy", "--config-dir", str(tmp_path / "site"),
                           "cluster=local-2node", f"model.source={tiny_opt_dir}", "deploy.launcher=sbatch",
                           f"plan={plan}", f"out={tmp_path / 'run.parquet'}", f"results={tmp_path / 'results'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sbatch" in proc.stderr and "nosuch" in proc.stderr and "no runs table written" in proc.stderr, proc.stderr
    assert not (tmp_path / "run.parquet").exists()
