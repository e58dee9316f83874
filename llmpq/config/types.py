"""Typed views of the composed configuration; every stage receives these, never raw dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .kernels import KernelTable

GIB = 1024**3


@dataclass(frozen=True)
class Efficiency:
    """Fraction of the roofline peak a real kernel reaches, per phase."""

    prefill: float = 0.5
    decode: float = 0.5


@dataclass(frozen=True)
class SlurmBlock:
    """A device's `slurm:` block: how a site's SLURM is asked for devices of this type.

    gpu_model: the site's GRES type of this GPU (`--gres=gpu:<gpu_model>:N`); gres: a whole GRES name[:type]
    instead (`--gres=<gres>:N`), for sites whose GPUs are not `gpu` GRES; partition (`-p`); constraint:
    a node feature expression (`-C`); memory_constraint: the node feature that only nodes with this card's
    memory size carry (ANDed with `constraint`), which tells a 16 GB from a 32 GB card of one GRES type.
    N, the count, comes from the plan.
    """

    gpu_model: str | None = None
    gres: str | None = None
    partition: str | None = None
    constraint: str | None = None
    memory_constraint: str | None = None


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
    compute_capability: float | None = None          # GPUs: from the spec sheet; None on a CPU
    kernels: tuple[tuple[int, str], ...] = ()        # (bits, kernel) overriding the menu derived from the capability
    name_pattern: str | None = None                  # GPUs: regex for the driver's name (`llmpq.config.identity`)
    slurm: SlurmBlock = field(default_factory=SlurmBlock, hash=False, compare=False)

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
    dtype: str = "auto"          # compute dtype on GPUs: auto | float16 | bfloat16 (`llmpq.config.dtypes`)
    install: str | None = None      # the command that provides `source` (shown when it is missing; never run)
    indicator: str | None = None    # the planner's sensitivity indicator for this model (else sensitivity.indicator)


@dataclass(frozen=True)
class WorkloadSpec:
    """An offline batch job: B prompts in flight, n tokens generated per prompt, prompts of s tokens.

    `prompts` names a text source to sample s-token prompts from, or a prompts file (`prompts_file`;
    `llmpq.data.prompts` has the rule). For a prompts file the config gives `max_new_tokens` (n) and no s:
    `prompt_len` is 0 until `llmpq.generate.planning` derives it from the file (the mean prompt, for
    time) together with `max_prompt_len` (the longest prompt, for memory).
    """

    name: str
    prompt_len: int                     # s (tokens per prompt); for a prompts file the planning length
    gen_len: int                        # n; for a prompts file its max_new_tokens
    batch: int                          # B: prompts in flight
    prompts: str = "shakespeare"
    stop: str = "eos"                   # eos: a sequence ends at the model's end-of-sequence token; none: at n
    overlong: str = "error"             # prompts over the context: error | truncate_left
    max_prompt_len: int | None = None   # the longest prompt (KV cache, buffers); None: prompt_len
    kind: str = "source"                # source (sampled prompts) | file (a prompts file)

    @property
    def prompts_file(self) -> str | None:
        """The prompts file's path, or None for a sampled workload."""
        return self.prompts if self.kind == "file" else None

    @property
    def longest_prompt(self) -> int:
        """The longest prompt the job may hold (tokens): what memory is planned for."""
        return self.max_prompt_len if self.max_prompt_len is not None else self.prompt_len

    @property
    def kv_len(self) -> int:
        """Cache positions one sequence may need: the longest prompt + n."""
        return self.longest_prompt + self.gen_len


@dataclass(frozen=True)
class DefaultBudget:
    """The quality budget a solver config takes when it gives none: `max_ppl_increase` (relative %) where the
    model has a ppl_map fitted on the plan's indicator, else Σω of the `budget_from` method's plan."""

    max_ppl_increase: float | None = None
    budget_from: str | None = None


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
    engine: str | None = None      # plan only what this inference engine runs fast (llmpq.export.engine)
    default_budget: DefaultBudget | None = None   # the budget when none of the three above is given


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
    kernels: "KernelTable | None" = field(default=None, hash=False, compare=False, repr=False)  # conf/kernels.yaml
