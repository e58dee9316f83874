"""Semantic validation of each config group: raw mapping -> typed spec, or a ConfigError naming file and key."""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Callable, Mapping

from ..data.prompt_source import OVERLONG_MODES, STOP_MODES, prompts_kind
from .dtypes import MODEL_DTYPES
from ..solve.methods import BASELINES, METHODS
from ..models.families import known_families
from .errors import ConfigError
from .types import (
    ClusterSpec,
    DefaultBudget,
    DeviceSpec,
    Efficiency,
    Link,
    ModelSpec,
    Node,
    QuantSpec,
    SlurmBlock,
    SolverSpec,
    WorkloadSpec,
)

KNOWN_BITS = (16, 8, 4, 3, 2)
KNOWN_METHODS = METHODS
KNOWN_BASELINES = BASELINES
KNOWN_BACKENDS = ("highs", "cbc")
KNOWN_SCHEMES = ("gptq", "rtn")
KNOWN_ENGINES = ("vllm", "sglang")
KNOWN_KERNELS = ("fp16", "marlin", "exllama", "triton", "torch")  # weight kernels (conf/kernels.yaml)


class Reader:
    """Reads typed keys from one group's mapping, raising ConfigError(file, key) on bad values.

    Every key a spec knows is read through `get` (present or not), so the keys read are the schema:
    `finish` refuses any other key of the mapping (and of every `sub` mapping), naming the nearest known one.
    """

    def __init__(self, file: str, data: Mapping[str, Any], prefix: str = ""):
        if not isinstance(data, Mapping):
            raise ConfigError(file, prefix or "<root>", f"expected a mapping, got {type(data).__name__}")
        self.file, self.data, self.prefix = file, data, prefix
        self.known: set[str] = set()
        self.children: list[Reader] = []

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), message)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., check: Callable[[Any], str | None] | None = None) -> Any:
        """Value of `name` as `kind`; `default` (if given) when missing or null; `check` returns an error text."""
        self.known.add(name)
        value = self.data.get(name)
        if value is None:
            if default is ...:
                if name in self.data:
                    raise self.fail(name, "must not be null")
                near = difflib.get_close_matches(name, [str(k) for k in self.data], n=1, cutoff=0.6)
                raise self.fail(name, "missing required key" + (f" (is `{near[0]}` a typo of it?)" if near else ""))
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(name, f"expected {names}, got {type(value).__name__} {value!r}")
        if check is not None and (problem := check(value)) is not None:
            raise self.fail(name, problem)
        return value

    def sub(self, name: str) -> "Reader":
        child = Reader(self.file, self.get(name, Mapping), self.key(name))
        self.children.append(child)
        return child

    def optional_sub(self, name: str) -> "Reader | None":
        """The reader of block `name`, or None where it is absent or null (a known key either way)."""
        self.known.add(name)
        return None if self.data.get(name) is None else self.sub(name)

    def allow(self, *names: str) -> None:
        """Declare keys that are valid here but read elsewhere (or free-form)."""
        self.known.update(names)

    def finish(self) -> None:
        """Refuse keys no `get` asked for: `reserve_gb: unknown key; did you mean reserve_gib?`."""
        for name in self.data:
            if str(name) not in self.known:
                near = difflib.get_close_matches(str(name), sorted(self.known), n=1, cutoff=0.6)
                hint = f"; did you mean `{near[0]}`?" if near else f" (known: {', '.join(sorted(self.known))})"
                raise self.fail(str(name), f"unknown key{hint}")
        for child in self.children:
            child.finish()


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda value: None if value in options else f"unknown value {value!r} (known: {', '.join(options)})"


def bit_list(value: list) -> str | None:
    if not value:
        return "must list at least one bit-width"
    bad = [b for b in value if b not in KNOWN_BITS]
    return f"unsupported bit-widths {bad} (known: {list(KNOWN_BITS)})" if bad else None


def kernel_overrides(r: Reader, bits: tuple[int, ...]) -> tuple[tuple[int, str], ...]:
    """A device's optional `kernels:` map (bits -> kernel name), checked for known names and listed bits."""
    raw = r.get("kernels", Mapping, {})
    out = []
    for key, name in raw.items():
        try:
            b = int(key)
        except (TypeError, ValueError):
            raise r.fail(f"kernels.{key}", "keys are bit-widths") from None
        if b not in bits:
            raise r.fail(f"kernels.{key}", f"{b} bits is not in this device's bits {list(bits)}")
        if name not in KNOWN_KERNELS:
            raise r.fail(f"kernels.{key}", f"unknown kernel {name!r} (known: {', '.join(KNOWN_KERNELS)})")
        out.append((b, str(name)))
    return tuple(sorted(out, reverse=True))


SLURM_KEYS = ("gpu_model", "gres", "partition", "constraint", "memory_constraint")


def slurm_block(r: Reader) -> SlurmBlock:
    """A device's `slurm:` block; unknown keys, gres with a count, and gres together with gpu_model are refused."""
    unknown = sorted(str(k) for k in r.data if k not in SLURM_KEYS)
    if unknown:
        raise r.fail(unknown[0], f"unknown key (known: {', '.join(SLURM_KEYS)})")
    values = {k: r.get(k, str, None, lambda v: None if v.strip() else "must not be empty") for k in SLURM_KEYS}
    gres = values["gres"]
    if gres is not None and (len(gres.split(":")) > 2 or gres.split(":")[-1].isdigit()):
        raise r.fail("gres", f"give the GRES as name or name:type without a count, got {gres!r} "
                             "(the count comes from the plan)")
    if gres is not None and values["gpu_model"] is not None:
        raise r.fail("gres", "give gres or gpu_model, not both")
    return SlurmBlock(**values)


def regex(value: str) -> str | None:
    """Why `value` is not a regular expression, or None."""
    try:
        re.compile(value)
    except re.error as exc:
        return f"not a regular expression: {exc}"
    return None


def device_spec(stem: str, file: str, data: Mapping[str, Any]) -> DeviceSpec:
    r = Reader(file, data)
    kind = r.get("kind", str, "gpu", one_of(("gpu", "cpu")))
    eff = r.optional_sub("efficiency")
    efficiency = Efficiency(
        prefill=eff.get("prefill", float, 0.5, positive), decode=eff.get("decode", float, 0.5, positive)
    ) if eff else Efficiency()
    threads = r.get("threads", int, None, positive)
    if kind == "cpu" and threads is None:
        raise r.fail("threads", "missing required key (a cpu device needs its thread count)")
    capability = r.get("compute_capability", float, None, positive)
    if kind == "cpu" and capability is not None:
        raise r.fail("compute_capability", "a cpu device has no compute capability")
    bits = tuple(r.get("bits", list, check=bit_list))
    spec = DeviceSpec(
        stem=stem,
        name=r.get("name", str),
        kind=kind,
        memory_gib=r.get("memory_gib", float, check=positive),
        mem_bandwidth_gbps=r.get("mem_bandwidth_gbps", float, check=positive),
        fp16_tflops=r.get("fp16_tflops", float, check=positive),
        int8_tops=r.get("int8_tops", float, None, positive),
        bits=bits,
        reserve_gib=r.get("reserve_gib", float, 0.0, non_negative),
        efficiency=efficiency,
        threads=threads,
        memory_cap_gib=r.get("memory_cap_gib", float, None, positive),
        slurm=slurm_block(block) if (block := r.optional_sub("slurm")) is not None else SlurmBlock(),
        compute_capability=capability,
        kernels=kernel_overrides(r, bits),
        name_pattern=r.get("name_pattern", str, None, regex),
    )
    if kind == "cpu" and spec.name_pattern is not None:
        raise r.fail("name_pattern", "a cpu device has no GPU name to match")
    r.finish()
    return spec


def link(r: Reader, name: str) -> Link:
    s = r.sub(name)
    return Link(bandwidth_gbps=s.get("bandwidth_gbps", float, check=positive), latency_us=s.get("latency_us", float, check=non_negative))


def cluster_spec(file: str, data: Mapping[str, Any], known_devices: Callable[[str], bool], all_devices: list[str]) -> ClusterSpec:
    r = Reader(file, data)
    raw_nodes = r.get("nodes", list, check=lambda v: None if v else "must list at least one node")
    nodes = []
    for i, raw in enumerate(raw_nodes):
        n = Reader(file, raw, f"nodes[{i}]")
        devices = n.sub("devices")
        if not devices.data:
            raise ConfigError(file, devices.prefix, "must name at least one device")
        entries = []
        for stem, count in devices.data.items():
            if not known_devices(str(stem)):
                raise devices.fail(str(stem), f"unknown device {stem!r} (known: {', '.join(all_devices)})")
            entries.append((str(stem), devices.get(str(stem), int, check=positive)))
        nodes.append(Node(name=n.get("name", str), devices=tuple(entries)))
        n.finish()
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise r.fail("nodes", f"node names must be unique, got {names}")
    links = r.sub("links")
    spec = ClusterSpec(
        name=r.get("name", str),
        nodes=tuple(nodes),
        present=r.get("present", bool, False),
        intra_node=link(links, "intra_node"),
        inter_node=link(links, "inter_node"),
        model=r.get("model", str, None),
        workloads=tuple(r.get("workloads", list, [])),
    )
    r.finish()
    return spec


def check_cpu_threads(file: str, cluster: ClusterSpec, devices: Mapping[str, DeviceSpec]) -> None:
    """A CPU cluster's devices may not use more threads than this machine has cores."""
    total = sum(devices[stem].threads or 0 for _, stem in cluster.device_slots() if devices[stem].kind == "cpu")
    cores = os.cpu_count() or 1
    if cluster.present and total > cores:
        raise ConfigError(file, "nodes", f"cpu devices use {total} threads in all but this machine has {cores} cores")


def model_spec(file: str, data: Mapping[str, Any]) -> ModelSpec:
    r = Reader(file, data)
    q = r.sub("quant")
    spec = ModelSpec(
        name=r.get("name", str),
        source=r.get("source", str),
        family=r.get("family", str, check=one_of(known_families())),
        bits=tuple(r.get("bits", list, check=bit_list)),
        quant=QuantSpec(scheme=q.get("scheme", str, "gptq", one_of(KNOWN_SCHEMES)), group_size=q.get("group_size", int, 128, positive)),
        hf_config=dict(r.get("hf_config", Mapping, {})) or None,
        dtype=r.get("dtype", str, "auto", one_of(MODEL_DTYPES)),
        install=r.get("install", str, None),
        indicator=r.get("indicator", str, None),
    )
    r.finish()
    return spec


def _prompts_kind(value: str) -> str | None:
    try:
        prompts_kind(value)
    except ValueError as exc:
        return str(exc)
    return None


def workload_spec(file: str, data: Mapping[str, Any]) -> WorkloadSpec:
    """A sampled workload (prompt_len, gen_len, batch, prompts: a text source) or a prompts-file workload
    (prompts: a .jsonl/.parquet path, max_new_tokens, batch); stop and overlong for either."""
    r = Reader(file, data)
    prompts = r.get("prompts", str, "shakespeare", _prompts_kind)
    kind = prompts_kind(prompts)
    common = {"name": r.get("name", str), "batch": r.get("batch", int, check=positive), "prompts": prompts,
              "stop": r.get("stop", str, "eos", one_of(STOP_MODES)),
              "overlong": r.get("overlong", str, "error", one_of(OVERLONG_MODES)), "kind": kind}
    if kind == "file":
        for key in ("prompt_len", "gen_len"):
            if data.get(key) is not None:
                raise r.fail(key, "not used with a prompts file (prompt lengths come from the file; "
                                  "the tokens to generate are max_new_tokens)")
        spec = WorkloadSpec(prompt_len=0, gen_len=r.get("max_new_tokens", int, check=positive), **common)
        r.allow("prompt_len", "gen_len")
        r.finish()
        return spec
    if data.get("max_new_tokens") is not None:
        raise r.fail("max_new_tokens", "only for a prompts file (prompts: PATH.jsonl); a sampled workload "
                                       "generates gen_len tokens")
    spec = WorkloadSpec(prompt_len=r.get("prompt_len", int, check=positive),
                        gen_len=r.get("gen_len", int, check=positive), **common)
    r.allow("max_new_tokens")
    r.finish()
    return spec


def _default_budget(r: Reader) -> DefaultBudget | None:
    d = r.optional_sub("default_budget")
    if d is None:
        return None
    spec = DefaultBudget(max_ppl_increase=d.get("max_ppl_increase", float, None, non_negative),
                         budget_from=d.get("budget_from", str, None, one_of(KNOWN_BASELINES)))
    d.finish()  # a typo is named before the emptiness it causes
    if spec.max_ppl_increase is None and spec.budget_from is None:
        raise d.fail("budget_from", "give max_ppl_increase, budget_from or both (or set default_budget: null)")
    return spec


def solver_spec(file: str, data: Mapping[str, Any]) -> SolverSpec:
    r = Reader(file, data)
    spec = SolverSpec(
        name=r.get("name", str),
        method=r.get("method", str, check=one_of(KNOWN_METHODS)),
        backend=r.get("backend", str, "highs", one_of(KNOWN_BACKENDS)),
        time_limit_s=r.get("time_limit_s", float, 10.0, positive),
        max_ppl_increase=r.get("max_ppl_increase", float, None, non_negative),
        max_omega=r.get("max_omega", float, None, non_negative),
        budget_from=r.get("budget_from", str, None, one_of(KNOWN_METHODS)),
        theta=r.get("theta", float, 0.0, non_negative),
        decode_points=r.get("decode_points", int, 3, positive),
        engine=r.get("engine", str, None, one_of(KNOWN_ENGINES)),
        default_budget=_default_budget(r),
    )
    budgets = [k for k in ("max_ppl_increase", "max_omega", "budget_from") if getattr(spec, k) is not None]
    if len(budgets) > 1:
        raise r.fail(budgets[1], f"give one quality budget, not {' and '.join(budgets)}")
    r.finish()
    return spec
