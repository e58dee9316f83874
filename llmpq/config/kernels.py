"""The weight-kernel table (`conf/kernels.yaml`): each kernel's limits and its latency-model constants.

A kernel is the code that multiplies activations by a layer's weights at some bit-width: `fp16` (the dense
16-bit GEMM), `marlin`, `exllama`, `triton` and `torch` (GPTQModel's quantized linears). Limits (bit-widths,
devices, compute capability, group sizes, shape alignment) come from GPTQModel's own kernel classes where
they declare them; latency constants (`bandwidth_efficiency`, `compute_slowdown`, `fused_max_rows`,
`dequant_passes`) and workspaces are fitted to or read off published figures, each with its source in the
YAML. This module types and checks the table (no torch import); `llmpq.costmodel.kernels` derives each
device's menu from it and `llmpq.costmodel.roofline` turns the constants into time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import ConfigError
from .validate import KNOWN_KERNELS as KERNEL_NAMES
from .types import DeviceSpec
from .validate import Reader

DENSE_KERNEL = "fp16"
DENSE_BITS = 16
DEVICE_KINDS = ("gpu", "cpu")
WORKSPACES = ("none", "per_call", "persistent", "repack")
TABLE_FILE = "kernels.yaml"


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: where it runs and how long it takes (see `conf/kernels.yaml` for every figure's source).

    Time model of one linear (in → out, `rows` = b·q), `llmpq.costmodel.roofline.linear_ms`:
    fused (rows ≤ fused_max_rows[bits]): max((packed bytes / bandwidth_efficiency + activations) / BW,
    2·rows·in·out · compute_slowdown(rows) / P); materialising (above): (packed bytes + dequant_passes·d·in·out)
    / BW + the dense GEMM at that shape.
    """

    name: str
    module: str                                   # the GPTQModel class (or torch op) that runs it
    bits: tuple[int, ...]
    device_kinds: tuple[str, ...]
    min_compute_capability: float | None = None   # GPUs only; None: no requirement
    sym: tuple[bool, ...] = (True, False)
    group_sizes: tuple[int, ...] | None = None    # None: any
    in_divisible_by: int = 1
    out_divisible_by: int = 1
    pack_aligned: bool = False                    # in and out divisible by 32 / bits (Marlin's packed tiles)
    auto_padding: bool = True                     # False: in_features must be a multiple of the group size
    fast: bool = False                            # runs a quantized GEMM without materialising the weight
    fused_max_rows: Mapping[int, float] = field(default_factory=dict)   # bits -> rows; missing: 0 (always dequantizes)
    bandwidth_efficiency: Mapping[int, float] = field(default_factory=dict)  # bits -> fraction of the dense GEMM's
    compute_slowdown: tuple[tuple[float, float], ...] = ((1.0, 1.0),)  # (rows, factor vs the dense GEMM), ascending
    dequant_passes: Mapping[str, float] = field(default_factory=dict)   # device kind -> d-bytes written per weight
    workspace: str = "none"
    workspace_bytes_per_weight: Mapping[str, float] = field(default_factory=dict)  # kind -> bytes per weight element

    def __post_init__(self) -> None:
        for name in ("fused_max_rows", "bandwidth_efficiency", "dequant_passes", "workspace_bytes_per_weight"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def runs_on(self, kind: str) -> bool:
        return kind in self.device_kinds

    def fused_rows(self, bits: int) -> float:
        """Rows up to which the kernel runs its own quantized GEMM at `bits` (0: it always dequantizes first)."""
        return float(self.fused_max_rows.get(bits, 0.0))

    def slowdown(self, rows: np.ndarray | float) -> np.ndarray:
        """s(rows): the fused GEMM's compute time over the dense GEMM's at the same shape, interpolated linearly in
        log2(rows) between the table's points and held constant beyond them."""
        x = np.log2(np.maximum(np.asarray(rows, dtype=float), 1.0))
        xs = np.log2([r for r, _ in self.compute_slowdown])
        ys = np.asarray([s for _, s in self.compute_slowdown])
        return np.interp(x, xs, ys)


@dataclass(frozen=True)
class ReferencePoint:
    """A published speed of a kernel against fp16 at some rows, on some device: what the model is fitted to or
    checked against (`fitted`: used by `benchmarks/kernel_model.py --fit`)."""

    kernel: str
    bits: int
    device: str          # device config stem of the GPU it was measured on
    rows: int
    speedup: float       # fp16 time / kernel time
    source: str
    fitted: bool = False

    @property
    def ratio(self) -> float:
        """kernel time / fp16 time."""
        return 1.0 / self.speedup


@dataclass(frozen=True)
class KernelTable:
    """Every kernel by name, in preference order (ties between equally fast kernels go to the earlier one), and the
    published points the latency constants are fitted to and checked against."""

    kernels: Mapping[str, KernelSpec]
    source: str = TABLE_FILE
    reference: tuple[ReferencePoint, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernels", MappingProxyType(dict(self.kernels)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.kernels)

    def spec(self, name: str) -> KernelSpec:
        if name not in self.kernels:
            raise KeyError(f"unknown kernel {name!r} (known: {', '.join(self.kernels)})")
        return self.kernels[name]

    def unavailable(self, name: str, device: DeviceSpec, bits: int, *, group_size: int | None = None,
                    sym: bool = True, linears: Iterable[tuple[int, int]] = ()) -> str | None:
        """Why kernel `name` cannot run `bits`-bit layers on `device` (None when it can).

        Checks, in order: the bit-width, the device kind, the compute capability (a GPU without one in its
        config gets no kernel that requires one), symmetric quantization, the group size, and every linear's
        (in_features, out_features) alignment.
        """
        spec = self.spec(name)
        if bits not in spec.bits:
            return f"{name} runs {'/'.join(map(str, spec.bits))}-bit weights only"
        if not spec.runs_on(device.kind):
            return f"{name} runs on {'/'.join(spec.device_kinds)} devices only, {device.stem} is a {device.kind}"
        need = spec.min_compute_capability
        if need is not None and device.kind == "gpu":
            have = device.compute_capability
            if have is None:
                return f"{name} needs compute capability >= {need:g}; {device.stem} declares none"
            if have + 1e-9 < need:
                return f"{name} needs compute capability >= {need:g}; {device.stem} has {have:g}"
        if bits == DENSE_BITS:
            return None
        if sym not in spec.sym:
            return f"{name} runs {'symmetric' if not sym else 'asymmetric'} quantization only"
        if group_size is not None and spec.group_sizes is not None and group_size not in spec.group_sizes:
            return f"{name} supports group sizes {list(spec.group_sizes)}, not {group_size}"
        pack = 32 // bits if spec.pack_aligned and 32 % bits == 0 else 1
        grouped = group_size is not None and group_size > 0 and not spec.auto_padding
        for k, n in linears:
            if grouped and k % group_size:
                return f"{name} needs in_features divisible by the group size {group_size}; a linear is {k} -> {n}"
            if k % max(spec.in_divisible_by, pack) or n % max(spec.out_divisible_by, pack):
                return (f"{name} needs in_features divisible by {max(spec.in_divisible_by, pack)} and out_features by "
                        f"{max(spec.out_divisible_by, pack)}; a linear is {k} -> {n}")
        return None

    def menu(self, device: DeviceSpec, *, group_size: int | None = None, sym: bool = True,
             linears: Iterable[tuple[int, int]] = ()) -> dict[int, tuple[str, ...]]:
        """The weight kernels a layer may use on `device`, per bit-width: bits -> kernel names in table order.

        For every bit-width the device lists (`bits:`), the kernels of the table that can run it there
        (`unavailable` is None), or exactly the one the device config's `kernels:` names for it. A bit-width
        with no kernel is left out: the planner never gives it to a layer on this device. This is the one
        place that says which bits (and kernels) a layer may have on a device.
        """
        linears = tuple(linears)
        forced = dict(device.kernels)
        out: dict[int, tuple[str, ...]] = {}
        for bits in device.bits:
            names = (forced[bits],) if bits in forced else self.names
            ok = tuple(n for n in names if self.unavailable(n, device, bits, group_size=group_size, sym=sym,
                                                            linears=linears) is None)
            if ok:
                out[bits] = ok
        return out

    def fast_bits(self, device: DeviceSpec, **kwargs: Any) -> tuple[int, ...]:
        """Bit-widths the device runs on a fast kernel (one that does not materialise the weight), highest first."""
        menu = self.menu(device, **kwargs)
        return tuple(sorted((b for b, names in menu.items() if any(self.spec(n).fast for n in names)), reverse=True))

    def check_overrides(self, device: DeviceSpec, file: str) -> None:
        """A device config's `kernels:` must name kernels that can run those bits there (ConfigError otherwise)."""
        for bits, name in device.kernels:
            problem = self.unavailable(name, device, bits)
            if problem is not None:
                raise ConfigError(file, f"kernels.{bits}", problem)


def _bits_map(r: Reader, name: str, kind: type, check) -> dict[int, Any]:
    raw = r.get(name, Mapping, {})
    out = {}
    for key, value in raw.items():
        try:
            bits = int(key)
        except (TypeError, ValueError):
            raise r.fail(f"{name}.{key}", "keys are bit-widths") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (problem := check(float(value))):
            raise r.fail(f"{name}.{key}", problem if not isinstance(value, bool) and isinstance(value, (int, float))
                         else f"expected a number, got {value!r}")
        out[bits] = kind(value)
    return out


def kernel_spec(name: str, file: str, data: Mapping[str, Any]) -> KernelSpec:
    """One kernel entry, checked; ConfigError naming the file and key otherwise."""
    r = Reader(file, data, f"kernels.{name}")
    positive = lambda v: None if v > 0 else f"must be > 0, got {v}"  # noqa: E731
    non_negative = lambda v: None if v >= 0 else f"must be >= 0, got {v}"  # noqa: E731
    bits = r.get("bits", list, check=lambda v: None if v and all(isinstance(b, int) for b in v)
                 else "must list bit-widths")
    kinds = r.get("devices", list, check=lambda v: None if v and set(v) <= set(DEVICE_KINDS)
                  else f"must list device kinds from {DEVICE_KINDS}")
    slowdown = r.get("compute_slowdown", Mapping, {1: 1.0})
    points = []
    for key, value in slowdown.items():
        try:
            rows, factor = float(key), float(value)
        except (TypeError, ValueError):
            raise r.fail(f"compute_slowdown.{key}", "expected rows: factor") from None
        if rows < 1 or factor <= 0 or not math.isfinite(factor):
            raise r.fail(f"compute_slowdown.{key}", f"rows >= 1 and factor > 0, got {key}: {value}")
        points.append((rows, factor))
    workspace = r.get("workspace", str, "none",
                      lambda v: None if v in WORKSPACES else f"unknown workspace {v!r} (known: {', '.join(WORKSPACES)})")
    group_sizes = r.get("group_sizes", list, None)
    return KernelSpec(
        name=name,
        module=r.get("module", str),
        bits=tuple(int(b) for b in bits),
        device_kinds=tuple(kinds),
        min_compute_capability=r.get("min_compute_capability", float, None, positive),
        sym=tuple(r.get("sym", list, [True, False])),
        group_sizes=tuple(int(g) for g in group_sizes) if group_sizes is not None else None,
        in_divisible_by=r.get("in_divisible_by", int, 1, positive),
        out_divisible_by=r.get("out_divisible_by", int, 1, positive),
        pack_aligned=r.get("pack_aligned", bool, False),
        auto_padding=r.get("auto_padding", bool, True),
        fast=r.get("fast", bool, False),
        fused_max_rows={b: v for b, v in _bits_map(r, "fused_max_rows", float, non_negative).items()},
        bandwidth_efficiency=_bits_map(r, "bandwidth_efficiency", float,
                                       lambda v: None if 0 < v <= 1.5 else f"must be in (0, 1.5], got {v}"),
        compute_slowdown=tuple(sorted(points)),
        dequant_passes={k: float(v) for k, v in r.get("dequant_passes", Mapping, {}).items()},
        workspace=workspace,
        workspace_bytes_per_weight={k: float(v) for k, v in r.get("workspace_bytes_per_weight", Mapping, {}).items()},
    )


def kernel_table(file: str, data: Mapping[str, Any]) -> KernelTable:
    """The whole table from its YAML mapping: every kernel of `KERNEL_NAMES`, in file order."""
    r = Reader(file, data)
    raw = r.get("kernels", Mapping)
    unknown = sorted(set(map(str, raw)) - set(KERNEL_NAMES))
    if unknown:
        raise ConfigError(file, f"kernels.{unknown[0]}", f"unknown kernel (known: {', '.join(KERNEL_NAMES)})")
    missing = [k for k in KERNEL_NAMES if k not in raw]
    if missing:
        raise ConfigError(file, f"kernels.{missing[0]}", "missing kernel entry")
    specs = {str(name): kernel_spec(str(name), file, body) for name, body in raw.items()}
    dense = specs[DENSE_KERNEL]
    if dense.bits != (DENSE_BITS,):
        raise ConfigError(file, f"kernels.{DENSE_KERNEL}.bits", f"the dense kernel serves exactly [{DENSE_BITS}]")
    points = []
    for i, item in enumerate(r.get("reference", list, [])):
        ref = Reader(file, item, f"reference[{i}]")
        kernel = ref.get("kernel", str, check=lambda v: None if v in specs else f"unknown kernel {v!r}")
        bits = ref.get("bits", int, check=lambda v, k=kernel: None if v in specs[k].bits else f"{k} does not run {v} bits")
        points.append(ReferencePoint(kernel, bits, ref.get("device", str), ref.get("rows", int),
                                     ref.get("speedup", float, check=lambda v: None if v > 0 else "must be > 0"),
                                     ref.get("source", str), ref.get("fitted", bool, False)))
    return KernelTable(specs, file, tuple(points))


def load_kernel_table(path: str | Path) -> KernelTable:
    """Read and check a kernel table YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "<file>", "kernel table not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "<file>", f"not YAML: {exc}") from None
    return kernel_table(str(path), data)

