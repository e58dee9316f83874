"""Compose one experiment from the Hydra config groups (Compose API only: no cwd change, no output dirs)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..data.text import check_source_name
from ..models.source import check_family
from .errors import ConfigError
from .kernels import TABLE_FILE, KernelTable, load_kernel_table
from .types import Experiment
from .validate import check_cpu_threads, cluster_spec, device_spec, model_spec, solver_spec, workload_spec

GROUPS = ("model", "cluster", "workload", "solver", "device")
CONFIG_DIR_ENV = "LLMPQ_CONFIG_DIR"  # the --config-dir of every verb when the option is not given


def default_conf_dir() -> Path:
    """The shipped `conf/`: the one in the working directory if present, else the repository's."""
    here = Path.cwd() / "conf"
    if (here / "config.yaml").is_file():
        return here.resolve()
    return (Path(__file__).resolve().parents[2] / "conf").resolve()


class ConfigSearch:
    """The config directories in search order: a user's --config-dir first (its files win), then the shipped conf dir.

    Without an explicit `config_dir`, the `LLMPQ_CONFIG_DIR` environment variable names it (the workflow sets
    it, so that the directory's path is not part of any rule's command line).
    """

    def __init__(self, conf_dir: Path | None = None, config_dir: str | Path | None = None):
        self.conf_dir = (conf_dir or default_conf_dir()).resolve()
        if not (self.conf_dir / "config.yaml").is_file():
            raise ConfigError(str(self.conf_dir), "config.yaml", "no primary config found")
        config_dir = config_dir or os.environ.get(CONFIG_DIR_ENV) or None
        self.user_dir = Path(config_dir).resolve() if config_dir else None
        if self.user_dir is not None and not self.user_dir.is_dir():
            raise ConfigError(str(config_dir), "--config-dir", "not a directory")

    @property
    def dirs(self) -> list[Path]:
        return ([self.user_dir] if self.user_dir else []) + [self.conf_dir]

    @contextmanager
    def hydra_root(self) -> Iterator[Path]:
        """A config directory for Hydra in which the user's group files shadow the shipped ones.

        Hydra searches its primary directory before any `hydra.searchpath` entry, so a user's file of the same
        stem would lose; instead Hydra gets a temporary tree of links, the shipped files overlaid by the user's.
        """
        if self.user_dir is None:
            yield self.conf_dir
            return
        with tempfile.TemporaryDirectory(prefix="llmpq-conf-") as tmp:
            root = Path(tmp)
            (root / "config.yaml").symlink_to(self.conf_dir / "config.yaml")
            for source in (self.conf_dir, self.user_dir):
                for path in source.glob("*/*.yaml"):
                    link = root / path.parent.name / path.name
                    link.parent.mkdir(exist_ok=True)
                    link.unlink(missing_ok=True)
                    link.symlink_to(path)
            yield root

    def file(self, group: str, option: str) -> Path | None:
        """Path of `group/option.yaml` as Hydra will find it, or None."""
        for d in self.dirs:
            path = d / group / f"{option}.yaml"
            if path.is_file():
                return path
        return None

    def options(self, group: str) -> list[str]:
        return sorted({p.stem for d in self.dirs for p in (d / group).glob("*.yaml")})

    def kernel_table_file(self) -> Path:
        """`kernels.yaml`: the user's config directory's if it has one, else the shipped one."""
        for d in reversed(self.dirs):
            if (d / TABLE_FILE).is_file():
                return d / TABLE_FILE
        return self.conf_dir / TABLE_FILE

    def label(self, group: str, option: str) -> str:
        """The file that defines `group/option`, followed by the files it inherits through its `defaults:` list
        (a key may come from either): `.../device/cpu-large.yaml (+ .../device/cpu.yaml)`."""
        path = self.file(group, option)
        if path is None:
            return f"{group}/{option}.yaml"
        parents = [self.label(group, name) for name in self._defaults(path) if name != option]
        return str(path) + (f" (+ {', '.join(parents)})" if parents else "")

    @staticmethod
    def _defaults(path: Path) -> list[str]:
        """Same-group options a config file names in its `defaults:` list (`_self_` excluded)."""
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            return []
        entries = data.get("defaults") if isinstance(data, dict) else None
        return [e for e in entries or [] if isinstance(e, str) and e != "_self_"]


def _hydra_compose(search: ConfigSearch, overrides: Sequence[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with search.hydra_root() as root, initialize_config_dir(config_dir=str(root), version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    except MissingConfigException as exc:
        group = next((g for g in GROUPS if f"'{g}/" in str(exc) or f"{g}/" in str(exc)), "overrides")
        known = ", ".join(search.options(group)) if group in GROUPS else ""
        raise ConfigError("overrides", group, f"{exc}".splitlines()[0] + (f" (known: {known})" if known else "")) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError("overrides", " ".join(overrides) or "<none>", str(exc).splitlines()[0]) from None
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _cluster_file(search: ConfigSearch, cluster: str) -> dict[str, Any]:
    """The cluster file as written ({} if absent or unreadable: composition reports that with file and key)."""
    import yaml

    path = search.file("cluster", cluster)
    try:
        data = yaml.safe_load(path.read_text()) if path else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _cluster_stems(search: ConfigSearch, cluster: str, overrides: Sequence[str]) -> list[str]:
    """Known device stems named by the cluster file (read directly: saves a second composition)."""
    if any(o.lstrip("+~").startswith("cluster.") for o in overrides):
        return []
    known = set(search.options("device"))
    nodes = _cluster_file(search, cluster).get("nodes") or []
    try:
        stems = [str(s) for n in nodes if isinstance(n, dict) for s in (n.get("devices") or {})]
    except (AttributeError, TypeError):
        return []
    return [s for s in dict.fromkeys(stems) if s in known]


def _cluster_defaults(search: ConfigSearch, chosen: dict[str, str], overrides: Sequence[str]) -> list[str]:
    """Overrides that give a cluster its own model and workload when the user named neither.

    A cluster file may name the model and workloads it is planned for (the paper's clusters do): without
    `model=`, its model is used; without `workload=`, its only workload, and with several the choice is refused
    with their names (planning the default tiny workload on it would be silently wrong).
    """
    data = _cluster_file(search, chosen["cluster"])
    named = {o.lstrip("+~").split("=", 1)[0] for o in overrides if "=" in o}
    extra = []
    if data.get("model") and "model" not in named:
        extra.append(f"model={data['model']}")
    workloads = [str(w) for w in data.get("workloads") or []]
    if workloads and "workload" not in named and chosen["workload"] not in workloads:
        if len(workloads) > 1:
            raise ConfigError(search.label("cluster", chosen["cluster"]), "workloads",
                              f"this cluster is planned for {', '.join(workloads)}: choose one with workload=NAME")
        extra.append(f"workload={workloads[0]}")
    return extra


def _renamed_workload(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """A workload changed by `workload.KEY=...` overrides gets a name of its own (its artifacts must not land on the
    paths of the unchanged workload): `<name>-<8 hex of its content>`, unless `workload.name=` names it."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides if o.lstrip("+~").startswith("workload.")]
    if keys and "workload.name" not in keys:
        body = {k: v for k, v in raw["workload"].items() if k != "name"}
        raw["workload"]["name"] = f"{raw['workload']['name']}-{config_hash(body)[:8]}"


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
    overrides: Sequence[str] = (), config_dir: str | Path | None = None, conf_dir: Path | None = None,
    cluster_defaults: bool = False,
) -> Experiment:
    """Compose, validate and type one experiment; raises ConfigError naming the file and key at fault.

    `cluster_defaults` (the CLI's choice): a cluster that names its model and workloads supplies them when the
    overrides do not (`_cluster_defaults`).
    """
    search = ConfigSearch(conf_dir, config_dir)
    defaults = _primary_defaults(search.conf_dir / "config.yaml")
    chosen = {g: _selected(overrides, g, defaults.get(g, "")) for g in ("model", "cluster", "workload", "solver")}
    if cluster_defaults:
        overrides = list(overrides) + _cluster_defaults(search, chosen, overrides)
        chosen = {g: _selected(overrides, g, defaults.get(g, "")) for g in chosen}
    stems = _cluster_stems(search, chosen["cluster"], overrides)
    raw = _hydra_compose(search, list(overrides) + [f"+device@devices.{s}={s}" for s in stems])
    _renamed_workload(raw, overrides)
    cluster_file = search.label("cluster", chosen["cluster"])
    known = search.options("device")
    cluster = cluster_spec(cluster_file, raw["cluster"], lambda s: s in known, known)
    if cluster.device_stems() != stems:
        raw = _hydra_compose(search, list(overrides) + [f"+device@devices.{s}={s}" for s in cluster.device_stems()])
    labels = {s: search.label("device", s) for s in cluster.device_stems()}
    devices = {s: device_spec(s, labels[s], raw["devices"][s]) for s in cluster.device_stems()}
    check_cpu_threads(cluster_file, cluster, devices)
    table, raw["kernels"] = _kernel_table(search)
    for stem, spec in devices.items():
        table.check_overrides(spec, labels[stem])
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
        kernels=table,
    )


def _kernel_table(search: ConfigSearch) -> tuple[KernelTable, dict[str, Any]]:
    """The kernel table of the search path, and its raw mapping (part of the config hash and rule params)."""
    import yaml

    path = search.kernel_table_file()
    table = load_kernel_table(path)
    return table, yaml.safe_load(path.read_text()) or {}


def default_kernel_table() -> KernelTable:
    """The shipped kernel table (`conf/kernels.yaml` of the default config directory)."""
    return load_kernel_table(default_conf_dir() / TABLE_FILE)


def load_device(stem: str, config_dir: str | Path | None = None, conf_dir: Path | None = None):
    """One device config by stem (for verbs that work on a device alone, like profile)."""
    search = ConfigSearch(conf_dir, config_dir)
    if search.file("device", stem) is None:
        raise ConfigError("overrides", "device", f"unknown device {stem!r} (known: {', '.join(search.options('device'))})")
    raw = _hydra_compose(search, [f"+device@devices.{stem}={stem}"])
    label = search.label("device", stem)
    spec = device_spec(stem, label, raw["devices"][stem])
    load_kernel_table(search.kernel_table_file()).check_overrides(spec, label)
    return spec


def _primary_defaults(path: Path) -> dict[str, str]:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    out: dict[str, str] = {}
    for entry in data.get("defaults", []):
        if isinstance(entry, dict):
            out.update({str(k): str(v) for k, v in entry.items()})
    return out
