"""Semantic validation of each config group: raw mapping -> typed spec, or a ConfigError naming file and key."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from ..models.families import known_families
from .errors import ConfigError
from .types import (
    ClusterSpec,
    DeviceSpec,
    Efficiency,
    Link,
    ModelSpec,
    Node,
    QuantSpec,
    SolverSpec,
    WorkloadSpec,
)

KNOWN_BITS = (16, 8, 4, 3, 2)
KNOWN_METHODS = ("llmpq", "pipeedge", "uniform", "adabits", "heuristic")
KNOWN_BACKENDS = ("highs", "cbc")
KNOWN_SCHEMES = ("gptq", "rtn")


class Reader:
    """Reads typed keys from one group's mapping, raising ConfigError(file, key) on bad values."""

    def __init__(self, file: str, data: Mapping[str, Any], prefix: str = ""):
        if not isinstance(data, Mapping):
            raise ConfigError(file, prefix or "<root>", f"expected a mapping, got {type(data).__name__}")
        self.file, self.data, self.prefix = file, data, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), message)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., check: Callable[[Any], str | None] | None = None) -> Any:
        """Value of `name` as `kind`; `default` (if given) when missing or null; `check` returns an error text."""
        value = self.data.get(name)
        if value is None:
            if default is ...:
                raise self.fail(name, "missing required key" if name not in self.data else "must not be null")
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
        return Reader(self.file, self.get(name, Mapping), self.key(name))


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


def device_spec(stem: str, file: str, data: Mapping[str, Any]) -> DeviceSpec:
    r = Reader(file, data)
    kind = r.get("kind", str, "gpu", one_of(("gpu", "cpu")))
    eff = r.sub("efficiency") if data.get("efficiency") is not None else None
    efficiency = Efficiency(
        prefill=eff.get("prefill", float, 0.5, positive), decode=eff.get("decode", float, 0.5, positive)
    ) if eff else Efficiency()
    threads = r.get("threads", int, None, positive)
    if kind == "cpu" and threads is None:
        raise r.fail("threads", "missing required key (a cpu device needs its thread count)")
    return DeviceSpec(
        stem=stem,
        name=r.get("name", str),
        kind=kind,
        memory_gib=r.get("memory_gib", float, check=positive),
        mem_bandwidth_gbps=r.get("mem_bandwidth_gbps", float, check=positive),
        fp16_tflops=r.get("fp16_tflops", float, check=positive),
        int8_tops=r.get("int8_tops", float, None, positive),
        bits=tuple(r.get("bits", list, check=bit_list)),
        reserve_gib=r.get("reserve_gib", float, 0.0, non_negative),
        efficiency=efficiency,
        threads=threads,
        memory_cap_gib=r.get("memory_cap_gib", float, None, positive),
        slurm=dict(r.get("slurm", Mapping, {})),
    )


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
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise r.fail("nodes", f"node names must be unique, got {names}")
    links = r.sub("links")
    return ClusterSpec(
        name=r.get("name", str),
        nodes=tuple(nodes),
        present=r.get("present", bool, False),
        intra_node=link(links, "intra_node"),
        inter_node=link(links, "inter_node"),
        model=r.get("model", str, None),
        workloads=tuple(r.get("workloads", list, [])),
    )


def check_cpu_threads(file: str, cluster: ClusterSpec, devices: Mapping[str, DeviceSpec]) -> None:
    """A CPU cluster's devices may not use more threads than this machine has cores."""
    total = sum(devices[stem].threads or 0 for _, stem in cluster.device_slots() if devices[stem].kind == "cpu")
    cores = os.cpu_count() or 1
    if cluster.present and total > cores:
        raise ConfigError(file, "nodes", f"cpu devices use {total} threads in all but this machine has {cores} cores")


def model_spec(file: str, data: Mapping[str, Any]) -> ModelSpec:
    r = Reader(file, data)
    q = r.sub("quant")
    return ModelSpec(
        name=r.get("name", str),
        source=r.get("source", str),
        family=r.get("family", str, check=one_of(known_families())),
        bits=tuple(r.get("bits", list, check=bit_list)),
        quant=QuantSpec(scheme=q.get("scheme", str, "gptq", one_of(KNOWN_SCHEMES)), group_size=q.get("group_size", int, 128, positive)),
        hf_config=dict(r.get("hf_config", Mapping, {})) or None,
        install=r.get("install", str, None),
        indicator=r.get("indicator", str, None),
    )


def workload_spec(file: str, data: Mapping[str, Any]) -> WorkloadSpec:
    r = Reader(file, data)
    return WorkloadSpec(
        name=r.get("name", str),
        prompt_len=r.get("prompt_len", int, check=positive),
        gen_len=r.get("gen_len", int, check=positive),
        batch=r.get("batch", int, check=positive),
        prompts=r.get("prompts", str, "shakespeare"),
    )


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
    )
    budgets = [k for k in ("max_ppl_increase", "max_omega", "budget_from") if getattr(spec, k) is not None]
    if len(budgets) > 1:
        raise r.fail(budgets[1], f"give one quality budget, not {' and '.join(budgets)}")
    return spec
