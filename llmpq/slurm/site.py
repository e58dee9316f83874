"""Site settings of SLURM submissions, read from the environment.

The SLURM profile (`profiles/slurm/config.yaml`) reads the same variables for the jobs that the Snakemake
plugin submits, so that every job of a run uses one account and one default partition. Unset means SLURM's
own default (the user's default account, the cluster's default partition).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

ACCOUNT_VAR = "LLMPQ_SLURM_ACCOUNT"
PARTITION_VAR = "LLMPQ_SLURM_PARTITION"


@dataclass(frozen=True)
class SiteSettings:
    """The account (`sbatch -A`) and the partition of devices whose `slurm:` block names none (`sbatch -p`)."""

    account: str | None = None
    partition: str | None = None

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> "SiteSettings":
        env = os.environ if env is None else env
        return SiteSettings(account=env.get(ACCOUNT_VAR) or None, partition=env.get(PARTITION_VAR) or None)
