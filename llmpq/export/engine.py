"""What vLLM and SGLang run fast, as rules: the bit-widths the planner may give a layer on a device, and
every way a plan breaks them (`llmpq export` refuses such a plan, naming each layer and rule).

Both engines load a GPTQ (v1) checkpoint whose `quantize_config.json` sets per-layer bits through
GPTQModel's `dynamic` rules, and split the pipeline unevenly by an environment variable. Their fast path
imposes, per decoder layer:

- `bits`: 16, 8 or 4. 16-bit layers stay unquantized (a `-:` rule). 2- and 3-bit layers exist only in
  the generic `gptq` method, which is chosen once for the whole model: one such layer moves every layer
  onto the slow kernel.
- `kernel`: a quantized layer needs a kernel on its stage's device: Marlin (4 and 8 bits, symmetric) from
  compute capability 8.0; below it, from 7.0, the generic `gptq_gemm` kernel (vLLM's support table:
  Volta and newer); none below 7.0 (Pascal), where layers stay at 16 bits. A GPU whose config gives no
  `compute_capability` is held to the generic kernel's limits. CPU stages run on the engines' CPU
  builds (not checked here: no engine is installed).
- `symmetric`: Marlin's weight types are uint4b8 and uint8b128, symmetric only.
- `fused_precision`: vLLM fuses q/k/v (and gate/up) into one module with one quantization method, so
  every linear of a layer must share bits, sym and desc_act.
- `group_size`: a quantized linear's input width must be a multiple of its group size. A group spanning
  the whole input is per-channel quantization (group_size -1), stored with the same tensors.
- `marlin_shape`: on Marlin, input width a multiple of 128 and output width of 64 (its thread tile),
  group size one of -1, 32, 64, 128.
- `device_kind`: one engine instance runs on GPUs or on CPUs, not both.

The same tensor-parallel size on every stage, the embedding on the first stage and the head on the last
hold by construction (llmpq exports tensor-parallel size 1 and plans the ends that way).
Sources: vLLM `quantization/gptq_marlin.py` (TYPE_MAP), `gptq.py` (bits, alignment), `utils/marlin_utils.py`
(tile 64 × 128, group sizes), `utils/gptq_utils.py` (dynamic rules, fused shards); SGLang's copies of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..config import DeviceSpec
from ..config.validate import KNOWN_ENGINES
from ..models.shape import LinearShape

if TYPE_CHECKING:
    from ..solve.plan import Plan

ENGINES = KNOWN_ENGINES
FP_BITS = 16
ENGINE_BITS = (16, 8, 4)
MARLIN_MIN_CC = 8.0
GENERIC_MIN_CC = 7.0
MARLIN_TILE_IN = 128
MARLIN_TILE_OUT = 64
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN, GENERIC, CPU = "marlin", "gptq_gemm", "cpu"


@dataclass(frozen=True)
class Violation:
    """One broken rule: which (layer and stage, or the whole plan), which rule, and why."""

    rule: str
    message: str
    layer: int | None = None
    stage: int | None = None

    def __str__(self) -> str:
        where = "plan" if self.layer is None else f"layer {self.layer}"
        where += "" if self.stage is None else f" (stage {self.stage})"
        return f"{where}: {self.rule}: {self.message}"


def check_engine(engine: str) -> str:
    """`engine` if it is a known engine name, else ValueError listing them."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    return engine


def quantized_kernel(device: DeviceSpec) -> str | None:
    """The engine kernel that runs this device's quantized layers (`marlin`, `gptq_gemm`, `cpu`), or None."""
    if device.kind == "cpu":
        return CPU
    cc = device.compute_capability
    if cc is None or GENERIC_MIN_CC <= cc < MARLIN_MIN_CC:
        return GENERIC
    return MARLIN if cc >= MARLIN_MIN_CC else None


def effective_group_size(group_size: int, in_features: int) -> int:
    """-1 (per-channel) where one group spans the whole input: the stored tensors are identical."""
    return -1 if group_size == -1 or group_size >= in_features else group_size


def shape_problems(kernel: str, linears: Sequence[LinearShape], group_size: int) -> list[tuple[str, str]]:
    """(rule, message) for every linear of a layer that `kernel` cannot take quantized at `group_size`."""
    found: list[tuple[str, str]] = []
    for lin in linears:
        g = effective_group_size(group_size, lin.in_features)
        if g != -1 and lin.in_features % g:
            found.append(("group_size", f"{lin.name}: input width {lin.in_features} is not a multiple of group "
                                        f"size {g}"))
        if kernel != MARLIN:
            continue
        if lin.in_features % MARLIN_TILE_IN or lin.out_features % MARLIN_TILE_OUT:
            found.append(("marlin_shape", f"{lin.name}: {lin.in_features} -> {lin.out_features} does not tile "
                                          f"into Marlin's {MARLIN_TILE_IN} x {MARLIN_TILE_OUT} (input x output)"))
        if g not in MARLIN_GROUP_SIZES:
            found.append(("marlin_shape", f"{lin.name}: group size {g} (Marlin takes "
                                          f"{', '.join(map(str, MARLIN_GROUP_SIZES))})"))
    return found


def allowed_bits(engine: str, device: DeviceSpec, linears: Sequence[LinearShape], group_size: int) -> tuple[int, ...]:
    """The device's bit-widths that `engine` runs fast for a layer of `linears` quantized at `group_size`."""
    check_engine(engine)
    kernel = quantized_kernel(device)
    quantizable = kernel is not None and not shape_problems(kernel, linears, group_size)
    return tuple(b for b in device.bits if b in ENGINE_BITS and (b == FP_BITS or quantizable))


def restrict_devices(devices: Mapping[str, DeviceSpec], engine: str, linears: Sequence[LinearShape],
                     group_size: int) -> dict[str, DeviceSpec]:
    """The devices with `bits` cut to what `engine` runs fast (the planner's `solver.engine` option)."""
    out = {}
    for stem, device in devices.items():
        bits = allowed_bits(engine, device, linears, group_size)
        if not bits:
            raise ValueError(f"device {stem}: none of its bit-widths {list(device.bits)} runs fast on {engine} "
                             f"(it runs {', '.join(map(str, ENGINE_BITS))})")
        out[stem] = replace(device, bits=bits)
    return out


def _stored_problems(settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Rules only the stored linears of one layer can break (`settings`: name -> LinearQuant)."""
    found = [("symmetric", f"{name}: stored asymmetric (Marlin takes symmetric weights only)")
             for name, q in sorted(settings.items()) if q.bits < FP_BITS and not q.sym]
    kinds = {(q.bits, q.sym, q.desc_act) for q in settings.values()}
    if len(kinds) > 1:
        found.append(("fused_precision", "linears stored at different settings "
                                         f"{sorted(kinds)} (bits, sym, desc_act); fused modules need one"))
    return found


def plan_violations(engine: str, plan: "Plan", devices: Mapping[str, DeviceSpec], linears: Sequence[LinearShape],
                    group_size: int, stored: Mapping[int, Mapping[str, Any]] | None = None) -> list[Violation]:
    """Every way `plan` breaks `engine`'s rules (module docstring), in layer order.

    `stored` (layer -> linear name -> LinearQuant, read from the layer files) adds the rules that only
    the stored weights can answer: symmetric, one precision per layer.
    """
    check_engine(engine)
    found: list[Violation] = []
    kinds = {devices[s.device].kind for s in plan.stages}
    if len(kinds) > 1:
        found.append(Violation("device_kind", f"stages on {' and '.join(sorted(kinds))} devices: one {engine} "
                                              "instance runs on one kind"))
    for j, stage in enumerate(plan.stages):
        device = devices[stage.device]
        kernel = quantized_kernel(device)
        for i, bits in zip(range(stage.start, stage.end), stage.bits):
            problems: list[tuple[str, str]] = []
            if bits not in ENGINE_BITS:
                problems.append(("bits", f"{bits}-bit; {engine} runs {', '.join(map(str, ENGINE_BITS))}-bit layers "
                                         "fast (one 2- or 3-bit layer moves every layer onto the generic gptq kernel)"))
            elif bits < FP_BITS and kernel is None:
                problems.append(("kernel", f"{bits}-bit on {stage.device} (compute capability "
                                           f"{device.compute_capability}): no quantized kernel below "
                                           f"{GENERIC_MIN_CC}; keep it at 16 bits"))
            elif bits < FP_BITS:
                problems += shape_problems(kernel, linears, group_size)
            if stored is not None and i in stored and bits < FP_BITS:
                problems += _stored_problems(stored[i])
            found += [Violation(rule, f"{stage.device}: {text}", i, j) for rule, text in problems]
    return found
