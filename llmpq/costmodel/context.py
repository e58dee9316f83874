"""Everything the estimator needs, built once per (model, cluster, workload): shapes, devices, latency, links."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from llmpq import paths
from llmpq.config import ClusterSpec, DeviceSpec, Experiment, Link, QuantSpec, WorkloadSpec
from llmpq.models.shape import ModelShape

from .comm import LINK_CLASSES, fit_link
from .latency import LatencyModel, build_latency_model


@dataclass(frozen=True)
class CostContext:
    """The inputs of every cost term; `links` holds measured link classes (idle transfers, the link's time c_j) and
    `per_message` the measured cost per message under load that a sending stage pays (both may be empty)."""

    shape: ModelShape
    devices: Mapping[str, DeviceSpec]
    cluster: ClusterSpec
    workload: WorkloadSpec
    quant: QuantSpec
    latency: LatencyModel
    links: Mapping[str, Link] = field(default_factory=dict)
    model: str = ""   # the model config's name (for messages; the shape says only its family)
    per_message: Mapping[str, Link] = field(default_factory=dict)   # a sending stage's own cost per message

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", MappingProxyType(dict(self.devices)))
        object.__setattr__(self, "links", MappingProxyType(dict(self.links)))
        object.__setattr__(self, "per_message", MappingProxyType(dict(self.per_message)))


def read_links(path: Path, load: str = "idle", fallback: bool = True) -> dict[str, Link]:
    """Measured link classes of a `links` table: α and bandwidth fitted per link class to its points measured under
    `load` (idle: a ping-pong's one-way transfer; busy: the extra cost per message with both ranks computing, what a
    pipeline stage pays in its own time), else (`fallback`) to its idle points; without `fallback` a class lacking
    `load` points is left out."""
    from llmpq.artifacts import read_table

    df = read_table("links", path).to_pandas()
    out: dict[str, Link] = {}
    for name, rows in df.groupby("link", sort=True):
        if name not in LINK_CLASSES:
            raise ValueError(f"{path}: unknown link class {name!r} (known: {', '.join(LINK_CLASSES)})")
        chosen = rows[rows["load"] == load]
        if chosen["payload_bytes"].nunique() < 2:
            if not fallback:
                continue
            chosen = rows[rows["load"] == "idle"]
        out[str(name)] = fit_link(chosen["payload_bytes"].to_numpy(float), chosen["latency_ms"].to_numpy(float))
    return out


def profile_paths(exp: Experiment, results: Path) -> dict[str, Path]:
    """Device stem -> profile parquet, for the cluster's devices that have been profiled with this model."""
    found = {stem: paths.profile_path(results, stem, exp.model.name) for stem in exp.cluster.device_stems()}
    return {stem: p for stem, p in found.items() if p.is_file()}


def build_context(exp: Experiment, results: Path, shape: ModelShape | None = None) -> CostContext:
    """The cost context of an experiment, reading profiles and measured links from `results` if present.

    `shape` defaults to the model's configured shape (`llmpq.models.source.model_shape`).
    """
    from llmpq.models.source import model_shape

    shape = shape or model_shape(exp.model)
    latency = build_latency_model(shape, exp.devices, exp.model.quant, profile_paths(exp, Path(results)), exp.kernels)
    links_file = paths.links_path(Path(results), exp.cluster.name)
    links = read_links(links_file) if links_file.is_file() else {}
    per_message = read_links(links_file, "busy", fallback=False) if links_file.is_file() else {}
    return CostContext(shape=shape, devices=exp.devices, cluster=exp.cluster, workload=exp.workload,
                       quant=exp.model.quant, latency=latency, links=links, model=exp.model.name,
                       per_message=per_message)
