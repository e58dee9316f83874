"""The plan: a typed, immutable record of a solved placement, and its canonical JSON.

Canonical form: sorted keys, two-space indent, floats rounded to 9 significant digits, no wall-clock or
host data (those go to the sidecar `<plan>.meta.json`), so identical inputs give identical bytes.
`read_plan` validates structure and meaning (contiguous stages from layer 0, one bit-width per layer,
a known weight kernel for each of a stage's bit-widths, known statuses and sources) and names the file and
key at fault.

A method that cannot fit is a result too (`InfeasiblePlan`): the same file with `solver.status: infeasible`,
no stages, and `infeasible: {kind: memory|budget, message, ...}` (for memory: per device its capacity, what it
needs before any layer, one layer's bytes, the layers that fit and the layers it would have to hold).
`read_plan` refuses it with its message (a plan to run needs stages); `read_any_plan` returns either, for
the steps that report it (deploy and generate skip it, evaluate lists it). `stages[i].kernels` ({bits: kernel}) is written by every solve; a plan written before it
existed reads as `fp16` for 16 bits and `torch` otherwise (what the runtime then loaded everywhere).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config.dtypes import DTYPES
from ..config.kernels import DENSE_BITS, DENSE_KERNEL, KERNEL_NAMES
from ..costmodel.memory import StageMemory as StageMemoryPlan  # one record of a stage's memory parts
from ..data.prompts import PromptStats

SCHEMA_VERSION = 1
STATUSES = ("optimal", "feasible", "infeasible", "timeout")
PLAN_SOURCES = ("milp", "heuristic", "baseline")
LATENCY_SOURCES = ("profile", "roofline")
OMEGA_SOURCES = ("indicator", "proxy")
MEMORY_KEYS = ("weights_bytes", "kv_bytes", "activations_bytes", "embed_bytes", "head_bytes", "buffers_bytes",
               "reserve_bytes", "capacity_bytes")
FLOAT_DIGITS = 9
LEGACY_QUANT_KERNEL = "torch"  # the kernel of quantized layers in plans that predate `stages[i].kernels`


class PlanError(ValueError):
    """A plan file that does not match the plan schema."""


class InfeasiblePlanError(PlanError):
    """A plan file that records that its method could not fit: nothing to run."""


@dataclass(frozen=True)
class InfeasiblePlan:
    """A method's infeasibility as its plan artifact (module docstring); `report` is the kind-specific detail."""

    method: str
    model: str
    cluster: str
    workload: str
    kind: str          # memory | budget
    message: str
    report: Mapping[str, Any]
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "method": self.method, "model": self.model,
                "cluster": self.cluster, "workload": self.workload, "stages": [],
                "solver": {"status": "infeasible"},
                "infeasible": {"kind": self.kind, "message": self.message, **_rounded(dict(self.report))}}

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys, rounded floats), ending in a newline."""
        validate_infeasible(self.to_dict(), "plan")
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return _round(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


INFEASIBLE_KINDS = ("memory", "budget")


def validate_infeasible(data: Mapping[str, Any], where: str) -> None:
    """Raise PlanError unless `data` is a valid infeasible-plan object."""
    if _need(data, "schema_version", int, where) != SCHEMA_VERSION:
        raise PlanError(f"{where}.schema_version: {data['schema_version']} (this llmpq reads {SCHEMA_VERSION})")
    for key in ("method", "model", "cluster", "workload"):
        _need(data, key, str, where)
    if _need(data, "stages", list, where):
        raise PlanError(f"{where}.stages: an infeasible plan has no stages")
    _one_of(_need(_need(data, "solver", dict, where), "status", str, f"{where}.solver"), ("infeasible",),
            f"{where}.solver.status")
    info = _need(data, "infeasible", dict, where)
    _one_of(_need(info, "kind", str, f"{where}.infeasible"), INFEASIBLE_KINDS, f"{where}.infeasible.kind")
    _need(info, "message", str, f"{where}.infeasible")


def is_infeasible(data: Mapping[str, Any]) -> bool:
    """Whether a plan object records an infeasible method."""
    solver = data.get("solver")
    return isinstance(solver, Mapping) and solver.get("status") == "infeasible"


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: device stem, node, layers [start, end), per-layer bits, memory, predicted times."""

    device: str
    node: str
    start: int
    end: int
    bits: tuple[int, ...]
    memory: StageMemoryPlan
    prefill_ms: float   # one prefill micro-batch
    decode_ms: float    # one decode micro-batch at mid-generation context
    kernels: tuple[tuple[int, str], ...] = ()   # (bits, weight kernel), highest bits first

    def __post_init__(self) -> None:
        if not self.kernels:
            object.__setattr__(self, "kernels", legacy_kernels(self.bits))
        object.__setattr__(self, "kernels", tuple(sorted(((int(b), str(k)) for b, k in self.kernels), reverse=True)))

    @property
    def kernel_map(self) -> dict[int, str]:
        """bits -> weight kernel."""
        return dict(self.kernels)


def legacy_kernels(bits) -> tuple[tuple[int, str], ...]:
    """The kernels of a plan that records none: fp16 at 16 bits, torch below."""
    return tuple((b, DENSE_KERNEL if b == DENSE_BITS else LEGACY_QUANT_KERNEL) for b in sorted(set(bits), reverse=True))


@dataclass(frozen=True)
class PlanPrompts:
    """The prompts file a plan was made for (a workload with `prompts: PATH`): its sha256 and the length
    statistics the planning shape came from, and n."""

    stats: PromptStats
    max_new_tokens: int

    def to_dict(self) -> dict[str, Any]:
        data = self.stats.to_dict()
        data["mean_tokens"] = _round(data["mean_tokens"])
        return {**data, "planning_len": self.stats.planning_len, "max_new_tokens": self.max_new_tokens}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "PlanPrompts":
        names = PromptStats.__dataclass_fields__
        return PlanPrompts(PromptStats(**{k: data[k] for k in names}), int(data["max_new_tokens"]))


@dataclass(frozen=True)
class Plan:
    """A solved plan (the contract between solve, deploy, evaluate); see workflow/schemas/plan.schema.json."""

    method: str
    model: str
    cluster: str
    workload: str
    quant_scheme: str
    quant_group_size: int
    micro_batch_prefill: int
    micro_batch_decode: int
    stages: tuple[StagePlan, ...]
    prefill_s: float
    decode_s: float
    throughput_tok_s: float
    bottleneck_stage: int
    omega: float
    ppl_increase: float | None
    budget: float | None
    latency_source: str
    omega_source: str
    status: str
    objective: float | None
    gap: float | None
    plan_source: str
    schema_version: int = SCHEMA_VERSION
    prompts: PlanPrompts | None = None
    dtype: str | None = None    # every stage's compute dtype (`llmpq.config.dtypes`); None in older plans

    @property
    def bits(self) -> tuple[int, ...]:
        """Per-layer bits in layer order."""
        return tuple(b for s in self.stages for b in s.bits)

    @property
    def num_layers(self) -> int:
        return self.stages[-1].end if self.stages else 0


def _round(x: float | None) -> float | None:
    if x is None:
        return None
    if not math.isfinite(x):
        raise PlanError(f"plan values must be finite, got {x!r}")
    return float(f"{x:.{FLOAT_DIGITS}g}")


def to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as the JSON object of the schema (floats rounded)."""
    data = {
        "schema_version": plan.schema_version,
        "method": plan.method,
        "model": plan.model,
        "cluster": plan.cluster,
        "workload": plan.workload,
        "quant": {"scheme": plan.quant_scheme, "group_size": plan.quant_group_size},
        "micro_batch": {"prefill": plan.micro_batch_prefill, "decode": plan.micro_batch_decode},
        "stages": [{
            "device": s.device, "node": s.node, "layers": [s.start, s.end], "bits": list(s.bits),
            "kernels": {str(b): k for b, k in s.kernels},
            "memory": {k: int(v) for k, v in asdict(s.memory).items()},
            "predicted": {"prefill_ms": _round(s.prefill_ms), "decode_ms": _round(s.decode_ms)},
        } for s in plan.stages],
        "predicted": {"prefill_s": _round(plan.prefill_s), "decode_s": _round(plan.decode_s),
                      "throughput_tok_s": _round(plan.throughput_tok_s), "bottleneck_stage": plan.bottleneck_stage},
        "quality": {"omega": _round(plan.omega), "ppl_increase": _round(plan.ppl_increase),
                    "budget": _round(plan.budget)},
        "sources": {"latency": plan.latency_source, "omega": plan.omega_source},
        "solver": {"status": plan.status, "objective": _round(plan.objective), "gap": _round(plan.gap),
                   "plan_source": plan.plan_source},
    }
    if plan.prompts is not None:
        data["prompts"] = plan.prompts.to_dict()
    if plan.dtype is not None:
        data["dtype"] = plan.dtype
    return data


def to_json(plan: Plan) -> str:
    """Canonical JSON text of a plan (module docstring), ending in a newline."""
    validate_dict(to_dict(plan), "plan")
    return json.dumps(to_dict(plan), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _need(obj: Mapping[str, Any], key: str, kind: type | tuple, where: str, nullable: bool = False) -> Any:
    if key not in obj:
        raise PlanError(f"{where}: missing key {key!r}")
    value = obj[key]
    if value is None and nullable:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise PlanError(f"{where}.{key}: expected {names}{' or null' if nullable else ''}, got {value!r}")
    return value


def _one_of(value: str, options: tuple[str, ...], where: str) -> str:
    if value not in options:
        raise PlanError(f"{where}: {value!r} is not one of {', '.join(options)}")
    return value


def validate_dict(data: Mapping[str, Any], where: str) -> None:
    """Raise PlanError unless `data` is a valid plan object (structure and meaning)."""
    num = (int, float)
    if _need(data, "schema_version", int, where) != SCHEMA_VERSION:
        raise PlanError(f"{where}.schema_version: {data['schema_version']} (this llmpq reads {SCHEMA_VERSION})")
    for key in ("method", "model", "cluster", "workload"):
        _need(data, key, str, where)
    quant = _need(data, "quant", dict, where)
    _need(quant, "scheme", str, f"{where}.quant")
    _need(quant, "group_size", int, f"{where}.quant")
    mb = _need(data, "micro_batch", dict, where)
    for key in ("prefill", "decode"):
        if _need(mb, key, int, f"{where}.micro_batch") < 1:
            raise PlanError(f"{where}.micro_batch.{key}: must be >= 1")
    stages = _need(data, "stages", list, where)
    if not stages:
        raise PlanError(f"{where}.stages: a plan needs at least one stage")
    expected = 0
    for j, st in enumerate(stages):
        w = f"{where}.stages[{j}]"
        _need(st, "device", str, w)
        _need(st, "node", str, w)
        layers = _need(st, "layers", list, w)
        if len(layers) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise PlanError(f"{w}.layers: expected [start, end] integers, got {layers!r}")
        start, end = layers
        if start != expected or end <= start:
            raise PlanError(f"{w}.layers: [{start}, {end}) does not continue the pipeline at layer {expected}")
        expected = end
        bits = _need(st, "bits", list, w)
        if len(bits) != end - start or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bits):
            raise PlanError(f"{w}.bits: expected {end - start} positive integers, got {bits!r}")
        if "kernels" in st:
            kernels = _need(st, "kernels", dict, w)
            if sorted(kernels) != sorted(str(b) for b in set(bits)):
                raise PlanError(f"{w}.kernels: expected one kernel for each of bits {sorted(set(bits))}, "
                                f"got {sorted(kernels)}")
            for b, name in kernels.items():
                if name not in KERNEL_NAMES:
                    raise PlanError(f"{w}.kernels.{b}: unknown kernel {name!r} (known: {', '.join(KERNEL_NAMES)})")
        memory = _need(st, "memory", dict, w)
        for key in MEMORY_KEYS:
            if _need(memory, key, int, f"{w}.memory") < 0:
                raise PlanError(f"{w}.memory.{key}: must be >= 0")
        pred = _need(st, "predicted", dict, w)
        _need(pred, "prefill_ms", num, f"{w}.predicted")
        _need(pred, "decode_ms", num, f"{w}.predicted")
    pred = _need(data, "predicted", dict, where)
    for key in ("prefill_s", "decode_s", "throughput_tok_s"):
        _need(pred, key, num, f"{where}.predicted")
    bottleneck = _need(pred, "bottleneck_stage", int, f"{where}.predicted")
    if not 0 <= bottleneck < len(stages):
        raise PlanError(f"{where}.predicted.bottleneck_stage: {bottleneck} is not a stage index")
    quality = _need(data, "quality", dict, where)
    _need(quality, "omega", num, f"{where}.quality")
    _need(quality, "ppl_increase", num, f"{where}.quality", nullable=True)
    _need(quality, "budget", num, f"{where}.quality", nullable=True)
    sources = _need(data, "sources", dict, where)
    _one_of(_need(sources, "latency", str, f"{where}.sources"), LATENCY_SOURCES, f"{where}.sources.latency")
    _one_of(_need(sources, "omega", str, f"{where}.sources"), OMEGA_SOURCES, f"{where}.sources.omega")
    solver = _need(data, "solver", dict, where)
    _one_of(_need(solver, "status", str, f"{where}.solver"), STATUSES, f"{where}.solver.status")
    _need(solver, "objective", num, f"{where}.solver", nullable=True)
    _need(solver, "gap", num, f"{where}.solver", nullable=True)
    _one_of(_need(solver, "plan_source", str, f"{where}.solver"), PLAN_SOURCES, f"{where}.solver.plan_source")
    if "dtype" in data:
        _one_of(_need(data, "dtype", str, where), DTYPES, f"{where}.dtype")
    if "prompts" in data:
        prompts = _need(data, "prompts", dict, where)
        _need(prompts, "sha256", str, f"{where}.prompts")
        for key in ("count", "min_tokens", "p50_tokens", "p90_tokens", "max_tokens", "truncated", "planning_len",
                    "max_new_tokens"):
            if _need(prompts, key, int, f"{where}.prompts") < 0:
                raise PlanError(f"{where}.prompts.{key}: must be >= 0")
        _need(prompts, "mean_tokens", num, f"{where}.prompts")


def from_dict(data: Mapping[str, Any], where: str = "plan") -> Plan:
    """A Plan from its JSON object, validated."""
    validate_dict(data, where)
    stages = tuple(StagePlan(
        device=s["device"], node=s["node"], start=s["layers"][0], end=s["layers"][1], bits=tuple(s["bits"]),
        memory=StageMemoryPlan(**{k: s["memory"][k] for k in MEMORY_KEYS}),
        prefill_ms=float(s["predicted"]["prefill_ms"]), decode_ms=float(s["predicted"]["decode_ms"]),
        kernels=tuple((int(b), k) for b, k in s.get("kernels", {}).items()),
    ) for s in data["stages"])
    q, p, solver = data["quality"], data["predicted"], data["solver"]

    def opt(x: Any) -> float | None:
        return None if x is None else float(x)

    return Plan(
        method=data["method"], model=data["model"], cluster=data["cluster"], workload=data["workload"],
        quant_scheme=data["quant"]["scheme"], quant_group_size=data["quant"]["group_size"],
        micro_batch_prefill=data["micro_batch"]["prefill"], micro_batch_decode=data["micro_batch"]["decode"],
        stages=stages, prefill_s=float(p["prefill_s"]), decode_s=float(p["decode_s"]),
        throughput_tok_s=float(p["throughput_tok_s"]), bottleneck_stage=p["bottleneck_stage"],
        omega=float(q["omega"]), ppl_increase=opt(q["ppl_increase"]), budget=opt(q["budget"]),
        latency_source=data["sources"]["latency"], omega_source=data["sources"]["omega"],
        status=solver["status"], objective=opt(solver["objective"]), gap=opt(solver["gap"]),
        plan_source=solver["plan_source"], schema_version=data["schema_version"],
        prompts=PlanPrompts.from_dict(data["prompts"]) if "prompts" in data else None, dtype=data.get("dtype"))


def read_any_plan(path: str | Path) -> Plan | InfeasiblePlan:
    """Read and validate a plan JSON file, feasible or not; PlanError names the file and key at fault."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such plan (run `llmpq solve`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: a plan is a JSON object")
    if is_infeasible(data):
        validate_infeasible(data, str(path))
        info = dict(data["infeasible"])
        return InfeasiblePlan(data["method"], data["model"], data["cluster"], data["workload"], info.pop("kind"),
                              info.pop("message"), info, data["schema_version"])
    return from_dict(data, str(path))


def read_plan(path: str | Path) -> Plan:
    """Read and validate a plan to run; PlanError names the file and key at fault, InfeasiblePlanError says why a
    method recorded as infeasible has none."""
    plan = read_any_plan(path)
    if isinstance(plan, InfeasiblePlan):
        raise InfeasiblePlanError(f"{path}: {plan.method} has no plan: {plan.kind} infeasible: {plan.message}")
    return plan


def meta_path(plan_path: str | Path) -> Path:
    """The sidecar of a plan: `<name>.meta.json` beside `<name>.json` (wall-clock and host data)."""
    p = Path(plan_path)
    return p.with_name(p.stem + ".meta.json")


def layers_path(plan_path: str | Path) -> Path:
    """The per-layer table of a plan: `<name>.parquet` beside `<name>.json`."""
    return Path(plan_path).with_suffix(".parquet")


def layer_rows(plan: Plan) -> list[dict[str, Any]]:
    """Rows of the `plan_layers` table: one per layer."""
    return [{"layer": s.start + k, "stage": j, "device": s.device, "node": s.node, "bits": b,
             "kernel": s.kernel_map[b]}
            for j, s in enumerate(plan.stages) for k, b in enumerate(s.bits)]
