"""What a per-layer file says about itself: the settings of each linear, stored in the safetensors metadata.

A layer file holds one decoder layer's tensors under their names relative to the layer
(`self_attn.q_proj.qweight`, `fc1.weight`, `final_layer_norm.bias`) and, under the metadata key
`llmpq.layer`, a JSON `LayerHeader`: the layer index, model type, scheme, bits and, per linear, its
`LinearQuant` (bits, group_size, sym, desc_act, format). Quantized linears are in the GPTQ checkpoint
layout (`format: gptq`, i.e. "v1": int32 `qweight`/`qzeros`/`g_idx`, fp16 `scales`/`bias`, zero-points
stored minus one); 16-bit linears are plain `weight`/`bias` (`format: fp`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Mapping

HEADER_KEY = "llmpq.layer"
HEADER_VERSION = 1
FP_BITS = 16
FP_FORMAT = "fp"
GPTQ_FORMAT = "gptq"
SCHEMES = ("gptq", "rtn")


@dataclass(frozen=True)
class LinearQuant:
    """How one linear's weight is stored: `bits` < 16 in the GPTQ layout, 16 as a plain weight."""

    bits: int
    group_size: int = -1
    sym: bool = True
    desc_act: bool = False
    format: str = GPTQ_FORMAT

    def __post_init__(self) -> None:
        if self.bits != FP_BITS and self.bits not in (2, 3, 4, 8):
            raise ValueError(f"unsupported weight bits {self.bits} (supported: 2, 3, 4, 8, 16)")
        if (self.bits == FP_BITS) != (self.format == FP_FORMAT):
            raise ValueError(f"bits={self.bits} does not go with format={self.format!r}")

    @property
    def quantized(self) -> bool:
        return self.bits < FP_BITS

    @classmethod
    def fp(cls) -> "LinearQuant":
        return cls(bits=FP_BITS, group_size=-1, sym=True, desc_act=False, format=FP_FORMAT)


@dataclass(frozen=True)
class LayerHeader:
    """The self-description of one layer file (see the module docstring)."""

    layer: int
    model_type: str
    scheme: str
    bits: int
    linears: Mapping[str, LinearQuant] = field(default_factory=dict)
    version: int = HEADER_VERSION

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata (str -> str) that stores this header."""
        data = asdict(self)
        data["linears"] = {name: asdict(q) for name, q in sorted(self.linears.items())}
        return {HEADER_KEY: json.dumps(data, sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None, where: str) -> "LayerHeader":
        """Parse the header of a layer file; ValueError naming `where` if it is missing or malformed."""
        raw = (metadata or {}).get(HEADER_KEY)
        if raw is None:
            raise ValueError(f"{where}: not an llmpq layer file (no {HEADER_KEY!r} metadata)")
        try:
            data = json.loads(raw)
            if data.get("version") != HEADER_VERSION:
                raise ValueError(f"header version {data.get('version')} (expected {HEADER_VERSION})")
            linears = {name: LinearQuant(**q) for name, q in data.pop("linears").items()}
            return cls(linears=linears, **data)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"{where}: malformed {HEADER_KEY!r} metadata: {exc}") from None
