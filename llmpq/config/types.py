"""Typed views of the composed configuration; every stage receives these, never raw dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

GIB = 1024**3


@dataclass(frozen=True)
class Efficiency:
    """Fraction of the roofline peak a real kernel reaches, per phase."""

    prefill: float = 0.5
    decode: float = 0.5


@dataclass(frozen=True)
class DeviceSpec:
    """One device type (a GPU model, or a slice of this machine's CPU cores)."""

    stem: str
    name: str
    kind: Literal["gpu", "cpu"]
    memory_gib: float
    mem_bandwidth_gbps: float
    fp16_tflops: float
    int8_tops: float | None
    bits: tuple[int, ...]
    reserve_gib: float = 0.0
    efficiency: Efficiency = Efficiency()
    threads: int | None = None
    memory_cap_gib: float | None = None
    slurm: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def reserve_bytes(self) -> int:
        return int(self.reserve_gib * GIB)


@dataclass(frozen=True)
class Link:
    """A link class: α (latency) + bytes / bandwidth."""

    bandwidth_gbps: float
    latency_us: float


@dataclass(frozen=True)
class Node:
    name: str
    devices: tuple[tuple[str, int], ...]  # (device stem, count) in file order


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    nodes: tuple[Node, ...]
    present: bool
    intra_node: Link
    inter_node: Link
    model: str | None = None
    workloads: tuple[str, ...] = ()

    def device_slots(self) -> list[tuple[str, str]]:
        """Every physical device as (node name, device stem), in file order."""
        return [(n.name, stem) for n in self.nodes for stem, count in n.devices for _ in range(count)]

    def device_stems(self) -> list[str]:
        """Distinct device stems, in file order."""
        seen: dict[str, None] = {}
        for n in self.nodes:
            for stem, _ in n.devices:
                seen[stem] = None
        return list(seen)


@dataclass(frozen=True)
class QuantSpec:
    scheme: str = "gptq"
    group_size: int = 128


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    family: str
    bits: tuple[int, ...]
    quant: QuantSpec
    hf_config: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    install: str | None = None      # the command that provides `source` (shown when it is missing; never run)
    indicator: str | None = None    # the planner's sensitivity indicator for this model (else sensitivity.indicator)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    prompt_len: int
    gen_len: int
    batch: int
    prompts: str = "shakespeare"


@dataclass(frozen=True)
class SolverSpec:
    name: str
    method: str
    backend: str = "highs"
    time_limit_s: float = 10.0
    max_ppl_increase: float | None = None
    max_omega: float | None = None
    budget_from: str | None = None
    theta: float = 0.0
    decode_points: int = 3


@dataclass(frozen=True)
class Experiment:
    """One composed, validated configuration: what every verb works on."""

    model: ModelSpec
    cluster: ClusterSpec
    devices: dict[str, DeviceSpec] = field(hash=False)
    workload: WorkloadSpec
    solver: SolverSpec
    raw: dict[str, Any] = field(hash=False, compare=False, repr=False)
    config_hash: str = ""
