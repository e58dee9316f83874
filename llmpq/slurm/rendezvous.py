"""Where the torch.distributed rendezvous of a SLURM step is: the first host of the allocation, a free port."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from typing import Mapping


def free_port() -> int:
    """A TCP port free on this host now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def first_slurm_node(env: Mapping[str, str]) -> str:
    """The first host of the allocation (`scontrol show hostnames`), else this host."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts[0]
    return socket.gethostname()


def node_address(node: str) -> str:
    """The address SLURM reaches `node` at (`NodeAddr` of `scontrol show node`; node names need not resolve)."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, check=False)
        found = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        if out.returncode == 0 and found:
            return found.group(1)
    return node
