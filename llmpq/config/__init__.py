"""Configuration: Hydra composition, validation and typed specs (never imports torch)."""

from .compose import ConfigSearch, compose_experiment, config_hash, default_kernel_table, load_device
from .errors import ConfigError
from .kernels import KernelSpec, KernelTable
from .types import ClusterSpec, DeviceSpec, Experiment, Link, ModelSpec, QuantSpec, SolverSpec, WorkloadSpec

__all__ = [
    "ClusterSpec", "ConfigError", "ConfigSearch", "DeviceSpec", "Experiment", "Link", "ModelSpec",
    "QuantSpec", "SolverSpec", "WorkloadSpec", "compose_experiment", "config_hash", "load_device",
    "KernelSpec", "KernelTable", "default_kernel_table",
]
