"""The GPTQ checkpoint layout and GPTQModel's `TorchLinear`: the one place that knows both.

Stored ("v1") layout of a linear with `in` inputs, `out` outputs, `G = ceil(in / group_size)` groups:
int32 `qweight` [in·bits/32, out], int32 `qzeros` [G, out·bits/32] (zero-points minus one), fp16
`scales` [G, out], int32 `g_idx` [in], fp16 `bias` [out]. Dequantized weight:
`W[o, i] = scales[g_idx[i], o] · (q[i, o] − zero[g_idx[i], o])`.

`TorchLinear` computes in "v2" (true zero-points), so every module built from a file goes through
`convert_gptq_v1_to_v2_format_module`; skipping it gives silently wrong outputs. 3-bit has two packing
layouts, so the module is always built with the file's `format`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .settings import LinearQuant

if TYPE_CHECKING:
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def gptqmodel() -> Any:
    """Import GPTQModel (slow: ~15 s; needs GPTQMODEL_CPU_WORKERS on small CPU machines, set here if unset)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel as module

    return module


@dataclass(frozen=True)
class GroupQuant:
    """A linear quantized on a per-group grid: scales and integer zero-points [out, G], group of each input."""

    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor


def new_qlinear(q: LinearQuant, in_features: int, out_features: int, bias: bool) -> "TorchLinear":
    """An empty `TorchLinear` with `q`'s settings (allocated on the current default device, e.g. `meta`)."""
    gptqmodel()
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization import FORMAT

    return TorchLinear(
        bits=q.bits, group_size=q.group_size, sym=q.sym, desc_act=q.desc_act,
        in_features=in_features, out_features=out_features, bias=bias,
        pack_dtype=torch.int32, register_buffers=True, format=FORMAT(q.format),
    )


def finalize_qlinear(module: "TorchLinear", dtype: torch.dtype) -> "TorchLinear":
    """Make a `TorchLinear` loaded with v1 tensors computable: v1→v2 zero-points, float buffers in `dtype`.

    `post_init` normally wraps the dequantization in `torch.compile`; that is skipped (`optimized`), since
    on CPU it costs seconds per module on first use and recompiles per instance, for no gain at small sizes.
    """
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    if module.qzero_format() == 1:
        convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
    module.to(dtype)
    module.optimized = True
    module.post_init()
    module.eval()
    return module


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, group: GroupQuant, q: LinearQuant) -> dict[str, torch.Tensor]:
    """The v1 tensors of a linear whose `weight` lies on `group`'s grid (the packer re-derives the codes
    by rounding, so pass the dequantized weight: rounding the original could break ties differently).

    GPTQModel's packer leaves true zero-points in `qzeros` (whatever format it is asked for), so they
    are converted v2→v1 here, to the layout GPTQ checkpoints store.
    """
    from gptqmodel import QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
    from gptqmodel.utils.packing import hf_pack_layer

    out_features, in_features = weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    module = new_qlinear(q, in_features, out_features, bias is not None)
    hf_pack_layer(module, linear, group.scales, group.zeros, group.g_idx, checkpoint_format=q.format)
    convert_gptq_v2_to_v1_format_module(module, QuantizeConfig(bits=q.bits, offload_to_disk=False))
    names = GPTQ_TENSORS + (("bias",) if bias is not None else ())
    return {name: getattr(module, name).detach().clone().contiguous() for name in names}


def dequantize(module: "TorchLinear") -> torch.Tensor:
    """The weight a finalized `TorchLinear` multiplies with, as [out, in] float32."""
    with torch.no_grad():
        return module.dequantize_weight().T.float().contiguous()


def densify(layer: torch.nn.Module) -> torch.nn.Module:
    """`layer` with every quantized linear replaced by an `nn.Linear` holding its dequantized weight.

    The same weights the quantized module multiplies with (exactly: fp16 scales × small integers), in a
    dense matmul instead of a dequantization per call; for evaluating many plans on a CPU, where
    `TorchLinear` re-dequantizes the whole weight on every call (about 3× slower at 4 bits).
    """
    for name, module in list(layer.named_modules()):
        if not hasattr(module, "qweight"):
            continue
        weight = dequantize(module)
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                device=weight.device, dtype=module.scales.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, dense.eval().requires_grad_(False))
    return layer


def group_steps(scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """The quantization step of every weight element, [out, in], from stored scales [G, out] and g_idx [in]."""
    return scales.float()[g_idx.long()].T.contiguous()
