"""`python -m llmpq.slurm.batch K -- COMMAND...`: inside a job of K components, start COMMAND on every task.

Runs where SLURM runs the batch script (the first node of component 0, where stage 0 runs): sets the
torch.distributed rendezvous to this node's address and a port free here, then `srun --kill-on-bad-exit=1
--label [--het-group=0-(K-1)] COMMAND`, so that every task of every component starts in one step and a task
that fails ends all of them. Exits with srun's status.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Mapping, Sequence

from ..runtime.job import STAGE_ENV
from .rendezvous import free_port, node_address


def srun_command(components: int, command: Sequence[str]) -> list[str]:
    """One step over all tasks of all `components` (a heterogeneous step when there are several)."""
    het = [f"--het-group=0-{components - 1}"] if components > 1 else []
    return ["srun", "--kill-on-bad-exit=1", "--label", *het, *command]


def rendezvous_env(env: Mapping[str, str]) -> dict[str, str]:
    """MASTER_ADDR (this node's SLURM address) and MASTER_PORT (free here) unless given, and the stage processes'
    environment (`llmpq.runtime.job.STAGE_ENV`)."""
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    out = {**STAGE_ENV, **env}
    out.setdefault("MASTER_ADDR", node_address(node))
    out.setdefault("MASTER_PORT", str(free_port()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or not argv[0].isdigit() or argv[1] != "--":
        print("usage: python -m llmpq.slurm.batch COMPONENTS -- COMMAND...", file=sys.stderr)
        return 2
    components, command = int(argv[0]), argv[2:]
    env = rendezvous_env(os.environ)
    cmd = srun_command(components, command)
    print(f"llmpq batch: job {env.get('SLURM_JOB_ID', '?')} on {env.get('SLURMD_NODENAME', socket.gethostname())}: "
          f"rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}; {' '.join(cmd[:4 + (components > 1)])} ...",
          flush=True)
    return subprocess.run(cmd, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
