"""Compose one experiment from the Hydra config groups (Compose API only: no cwd change, no output dirs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from ..data.text import check_source_name
from ..models.source import check_family
from .errors import ConfigError
from .types import Experiment
from .validate import check_cpu_threads, cluster_spec, device_spec, model_spec, solver_spec, workload_spec

GROUPS = ("model", "cluster", "workload", "solver", "device")


def default_conf_dir() -> Path:
    """The shipped `conf/`: the one in the working directory if present, else the repository's."""
    here = Path.cwd() / "conf"
    if (here / "config.yaml").is_file():
        return here.resolve()
    return (Path(__file__).resolve().parents[2] / "conf").resolve()


class ConfigSearch:
    """The config directories in search order: the shipped conf dir, then a user's --config-dir."""

    def __init__(self, conf_dir: Path | None = None, config_dir: str | Path | None = None):
        self.conf_dir = (conf_dir or default_conf_dir()).resolve()
        if not (self.conf_dir / "config.yaml").is_file():
            raise ConfigError(str(self.conf_dir), "config.yaml", "no primary config found")
        self.user_dir = Path(config_dir).resolve() if config_dir else None
        if self.user_dir is not None and not self.user_dir.is_dir():
            raise ConfigError(str(config_dir), "--config-dir", "not a directory")

    @property
    def dirs(self) -> list[Path]:
        return [self.conf_dir] + ([self.user_dir] if self.user_dir else [])

    def file(self, group: str, option: str) -> Path | None:
        """Path of `group/option.yaml` as Hydra will find it, or None."""
        for d in self.dirs:
            path = d / group / f"{option}.yaml"
            if path.is_file():
                return path
        return None

    def options(self, group: str) -> list[str]:
        return sorted({p.stem for d in self.dirs for p in (d / group).glob("*.yaml")})

    def label(self, group: str, option: str) -> str:
        path = self.file(group, option)
        return str(path) if path else f"{group}/{option}.yaml"


def _hydra_compose(search: ConfigSearch, overrides: Sequence[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    extra = [f"hydra.searchpath=[file://{search.user_dir}]"] if search.user_dir else []
    try:
        with initialize_config_dir(config_dir=str(search.conf_dir), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides) + extra)
    except MissingConfigException as exc:
        group = next((g for g in GROUPS if f"'{g}/" in str(exc) or f"{g}/" in str(exc)), "overrides")
        known = ", ".join(search.options(group)) if group in GROUPS else ""
        raise ConfigError("overrides", group, f"{exc}".splitlines()[0] + (f" (known: {known})" if known else "")) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError("overrides", " ".join(overrides) or "<none>", str(exc).splitlines()[0]) from None
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _cluster_stems(search: ConfigSearch, cluster: str, overrides: Sequence[str]) -> list[str]:
    """Known device stems named by the cluster file (read directly: saves a second composition)."""
    import yaml

    path = search.file("cluster", cluster)
    if path is None or any(o.lstrip("+~").startswith("cluster.") for o in overrides):
        return []
    known = set(search.options("device"))
    try:
        nodes = (yaml.safe_load(path.read_text()) or {}).get("nodes") or []
        stems = [str(s) for n in nodes if isinstance(n, dict) for s in (n.get("devices") or {})]
    except (yaml.YAMLError, AttributeError, TypeError):
        return []
    return [s for s in dict.fromkeys(stems) if s in known]


def _selected(overrides: Sequence[str], group: str, default: str) -> str:
    for o in overrides:
        if o.lstrip("+~").startswith(f"{group}="):
            return o.split("=", 1)[1]
    return default


def config_hash(data: Any) -> str:
    """sha256 (16 hex) of a config slice in canonical JSON: the provenance key of artifacts."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def compose_experiment(
    overrides: Sequence[str] = (), config_dir: str | Path | None = None, conf_dir: Path | None = None
) -> Experiment:
    """Compose, validate and type one experiment; raises ConfigError naming the file and key at fault."""
    search = ConfigSearch(conf_dir, config_dir)
    defaults = _primary_defaults(search.conf_dir / "config.yaml")
    chosen = {g: _selected(overrides, g, defaults.get(g, "")) for g in ("model", "cluster", "workload", "solver")}
    stems = _cluster_stems(search, chosen["cluster"], overrides)
    raw = _hydra_compose(search, list(overrides) + [f"+device@devices.{s}={s}" for s in stems])
    cluster_file = search.label("cluster", chosen["cluster"])
    known = search.options("device")
    cluster = cluster_spec(cluster_file, raw["cluster"], lambda s: s in known, known)
    if cluster.device_stems() != stems:
        raw = _hydra_compose(search, list(overrides) + [f"+device@devices.{s}={s}" for s in cluster.device_stems()])
    devices = {s: device_spec(s, search.label("device", s), raw["devices"][s]) for s in cluster.device_stems()}
    check_cpu_threads(cluster_file, cluster, devices)
    model_file = search.label("model", chosen["model"])
    model = model_spec(model_file, raw["model"])
    check_family(model, model_file, results=str(raw.get("results_dir") or "results"))
    for section in ("calibration", "eval"):
        source = (raw.get(section) or {}).get("source")
        if isinstance(source, str) and (problem := check_source_name(source)) is not None:
            raise ConfigError(str(search.conf_dir / "config.yaml"), f"{section}.source", problem)
    return Experiment(
        model=model,
        cluster=cluster,
        devices=devices,
        workload=workload_spec(search.label("workload", chosen["workload"]), raw["workload"]),
        solver=solver_spec(search.label("solver", chosen["solver"]), raw["solver"]),
        raw=raw,
        config_hash=config_hash({k: v for k, v in raw.items() if k not in ("experiments", "experiment_sets")}),
    )


def load_device(stem: str, config_dir: str | Path | None = None, conf_dir: Path | None = None):
    """One device config by stem (for verbs that work on a device alone, like profile)."""
    search = ConfigSearch(conf_dir, config_dir)
    if search.file("device", stem) is None:
        raise ConfigError("overrides", "device", f"unknown device {stem!r} (known: {', '.join(search.options('device'))})")
    raw = _hydra_compose(search, [f"+device@devices.{stem}={stem}"])
    return device_spec(stem, search.label("device", stem), raw["devices"][stem])


def _primary_defaults(path: Path) -> dict[str, str]:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    out: dict[str, str] = {}
    for entry in data.get("defaults", []):
        if isinstance(entry, dict):
            out.update({str(k): str(v) for k, v in entry.items()})
    return out
