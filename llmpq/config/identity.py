"""Which physical GPU a device config stands for: its name pattern plus its memory, never an exact string.

nvidia-smi names one model many ways ("NVIDIA A100 80GB PCIe", "NVIDIA A100-SXM4-80GB", "Tesla V100-PCIE-32GB",
"NVIDIA H100 NVL"), so a GPU device config gives `name_pattern`, a regular expression searched (case-insensitive)
in the name the driver reports with spaces and underscores alike, and `memory_gib`, the driver's total. A GPU
matches a config when the pattern is found and its memory is within `MEMORY_TOLERANCE` of the config's (that
tells a V100 16 GB from a 32 GB one, an A100 40 GB from an 80 GB one, an H100 80 GB from an H100 NVL's 94 GB).
A config without `name_pattern` matches its `name` as a whole word. CPU devices always match.

`device_mismatch` is the one check: the deploy launcher and every stage process call it before loading (the
error names the planned and the found device), and so can a SLURM placement check. No torch import here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from .types import GIB, DeviceSpec

MEMORY_TOLERANCE = 0.10   # relative difference allowed between the reported and the configured memory


@dataclass(frozen=True)
class FoundDevice:
    """A GPU as the driver reports it: its name and total memory (bytes)."""

    name: str
    memory_bytes: int

    def describe(self) -> str:
        return f"{self.name} with {self.memory_bytes / GIB:.1f} GiB"


@dataclass(frozen=True)
class GpuIdentity:
    """What identifies a GPU device type: its stem, configured name and name pattern, and memory (GiB)."""

    stem: str
    name: str
    name_pattern: str | None
    memory_gib: float

    @staticmethod
    def of(device: DeviceSpec) -> "GpuIdentity":
        return GpuIdentity(device.stem, device.name, device.name_pattern, device.memory_gib)

    def regex(self) -> re.Pattern[str]:
        """The name pattern (`name_pattern`, else the configured name as a whole word), matched against names with
        underscores read as spaces, ignoring case."""
        pattern = self.name_pattern or rf"(?<![\w-]){re.escape(_spaced(self.name))}(?![\w-])"
        return re.compile(_spaced(pattern), re.IGNORECASE)


def _spaced(text: str) -> str:
    return text.replace("_", " ")


def identity_mismatch(planned: GpuIdentity, found: FoundDevice) -> str | None:
    """Why the GPU `found` is not of the type `planned` (its name does not match the pattern, or its memory is off by
    more than `MEMORY_TOLERANCE`), naming both; None when it is one."""
    regex = planned.regex()
    if not regex.search(_spaced(found.name)):
        return (f"planned {planned.stem} (name matching {regex.pattern!r}, {planned.memory_gib:g} GiB), "
                f"found {found.describe()}")
    memory = planned.memory_gib * GIB
    if abs(found.memory_bytes - memory) > MEMORY_TOLERANCE * memory:
        return (f"planned {planned.stem} ({planned.memory_gib:g} GiB), found {found.describe()}: memory differs by "
                f"more than {MEMORY_TOLERANCE:.0%}")
    return None


def device_mismatch(device: DeviceSpec, found: FoundDevice) -> str | None:
    """`identity_mismatch` for a device config; None for a CPU device."""
    return None if device.kind == "cpu" else identity_mismatch(GpuIdentity.of(device), found)


def matching_device(devices: Mapping[str, DeviceSpec], found: FoundDevice) -> str | None:
    """The stem of the GPU config `found` is (nearest in memory where several match), or None."""
    hits = [(abs(spec.memory_gib * GIB - found.memory_bytes), stem) for stem, spec in devices.items()
            if spec.kind != "cpu" and device_mismatch(spec, found) is None]
    return min(hits)[1] if hits else None
