"""What SLURM is asked for per device of one type, from the device's `slurm:` block and the site settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.types import SlurmBlock
from .site import SiteSettings


@dataclass(frozen=True)
class DeviceRequest:
    """One device type in SLURM's terms: a GRES without its count (`gpu:t4`), a partition, a constraint."""

    gres: str | None = None
    partition: str | None = None
    constraint: str | None = None

    def gres_for(self, count: int) -> str | None:
        """`--gres` value for `count` devices on one node (`gpu:t4:3`), or None for a device without GRES."""
        return f"{self.gres}:{count}" if self.gres else None


def constraint_expression(constraint: str | None, memory_constraint: str | None) -> str | None:
    """The `-C` expression: the block's constraint AND its memory constraint (an OR is parenthesised first)."""
    if constraint and memory_constraint:
        left = f"({constraint})" if "|" in constraint else constraint
        return f"{left}&{memory_constraint}"
    return constraint or memory_constraint


def device_request(block: SlurmBlock, site: SiteSettings) -> DeviceRequest:
    """The request of one device type: `gres` as given, or `gpu:<gpu_model>`; the block's partition, else the site's."""
    gres = block.gres or (f"gpu:{block.gpu_model}" if block.gpu_model else None)
    return DeviceRequest(gres=gres, partition=block.partition or site.partition,
                         constraint=constraint_expression(block.constraint, block.memory_constraint))


def plugin_resources(block: SlurmBlock, site: SiteSettings, count: int = 1) -> dict[str, object]:
    """Resources of a rule that runs on `count` devices of one type, in snakemake-executor-plugin-slurm's keys.

    `gpu` + `gpu_model` (`--gpus=<model>:N`) for a gpu_model block, `gres` for a gres block; `slurm_partition` and
    `constraint` only where set (None drops the key, so the profile's default partition applies).
    """
    request = device_request(block, site)
    return {
        "gpu": count if block.gpu_model else 0,
        "gpu_model": block.gpu_model or "",
        "gres": request.gres_for(count) if block.gres else "",
        "slurm_partition": request.partition,
        "constraint": request.constraint,
    }
