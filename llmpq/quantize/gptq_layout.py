"""The GPTQ checkpoint layout and GPTQModel's quantized-linear kernels: the one place that knows both.

Stored ("v1") layout of a linear with `in` inputs, `out` outputs, `G = ceil(in / group_size)` groups:
int32 `qweight` [in·bits/32, out], int32 `qzeros` [G, out·bits/32] (zero-points minus one), fp16
`scales` [G, out], int32 `g_idx` [in], fp16 `bias` [out]. Dequantized weight:
`W[o, i] = scales[g_idx[i], o] · (q[i, o] − zero[g_idx[i], o])`.

One module per weight kernel (`conf/kernels.yaml`), built from the same v1 tensors by `new_qlinear` (on
`meta`, then `load_state_dict(assign=True)`) and made computable by `finalize_qlinear`:

- `torch` (`TorchLinear`, any device) and `triton` (`TritonV2Linear`, a `TorchLinear` subclass; CUDA) and
  `exllama` (`ExllamaV2Linear`; CUDA) compute in "v2" (true zero-points), so they go through
  `convert_gptq_v1_to_v2_format_module`; skipping it gives silently wrong outputs. `exllama` also needs a
  scratch buffer for the fp16 weight it reconstructs above 50 rows (`ExllamaScratch`, one per stage).
- `marlin` (`MarlinLinear`; CUDA, compute capability >= 7.5) reads the v1 layout as is (symmetric only) and
  repacks the weight into its own tile layout in `post_init`.

GPU-only code paths (triton, exllama, marlin finalization) run only where CUDA is; on a CPU only `torch`
exists. 3-bit has two packing layouts, so every module is built with the file's `format`.
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
KERNEL_CLASSES = {  # weight kernel -> (GPTQModel module, class); names as in conf/kernels.yaml
    "torch": ("gptqmodel.nn_modules.qlinear.torch", "TorchLinear"),
    "triton": ("gptqmodel.nn_modules.qlinear.tritonv2", "TritonV2Linear"),
    "exllama": ("gptqmodel.nn_modules.qlinear.exllamav2", "ExllamaV2Linear"),
    "marlin": ("gptqmodel.nn_modules.qlinear.marlin", "MarlinLinear"),
}
GPU_KERNELS = ("triton", "exllama", "marlin")  # CUDA only: their finalization needs a GPU
V1_KERNELS = ("marlin",)                       # read the checkpoint's v1 zero-points as they are


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


def qlinear_class(kernel: str) -> type:
    """GPTQModel's quantized-linear class of a weight kernel (imports GPTQModel)."""
    import importlib

    if kernel not in KERNEL_CLASSES:
        raise ValueError(f"no quantized-linear class for kernel {kernel!r} (known: {', '.join(KERNEL_CLASSES)})")
    gptqmodel()
    module, name = KERNEL_CLASSES[kernel]
    return getattr(importlib.import_module(module), name)


def new_qlinear(q: LinearQuant, in_features: int, out_features: int, bias: bool, kernel: str = "torch",
                dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """An empty quantized linear of `kernel` with `q`'s settings (allocated on the current default device, e.g.
    `meta`), whose state dict takes the v1 tensors of a layer file. `dtype`: Marlin's compute dtype."""
    from gptqmodel.quantization import FORMAT

    cls = qlinear_class(kernel)
    extra = {"dtype": dtype} if kernel == "marlin" else {}
    return cls(
        bits=q.bits, group_size=q.group_size, sym=q.sym, desc_act=q.desc_act,
        in_features=in_features, out_features=out_features, bias=bias,
        pack_dtype=torch.int32, register_buffers=True, format=FORMAT(q.format), **extra,
    )


class ExllamaScratch:
    """The fp16 scratch ExLlamaV2 modules reconstruct their weight into above 50 rows: one per stage, sized for its
    largest exllama linear (`temp_dq_size` = in·out·2 + 128 bytes), like GPTQModel's per-device scratch. GPU only."""

    def __init__(self, nbytes: int, device: torch.device):
        from gptqmodel.utils.exllamav2 import ScratchSpace

        self.space = ScratchSpace(scratch_bytes=nbytes, dev=device)


def exllama_scratch_bytes(linears: list[tuple[int, int]]) -> int:
    """Bytes of the ExLlamaV2 scratch for linears (in, out): max in·out·2 + 128 (`ExllamaV2Linear.temp_dq_size`)."""
    return max((k * n * 2 + 128 for k, n in linears), default=0)


def _materialize_runtime_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent buffers a kernel creates empty and fills in `post_init` are still on `meta` after loading the
    state dict: give them real (empty) storage on `device`."""
    for name, buf in list(module.named_buffers(recurse=False)):
        if buf is not None and buf.is_meta:
            module.register_buffer(name, torch.empty(buf.shape, dtype=buf.dtype, device=device), persistent=False)


def finalize_qlinear(module: torch.nn.Module, dtype: torch.dtype, kernel: str = "torch",
                     scratch: ExllamaScratch | None = None, device: torch.device | str | None = None) -> torch.nn.Module:
    """Make a quantized linear loaded with v1 tensors computable on its device (module docstring): v1→v2
    zero-points where the kernel computes in v2, float buffers in `dtype`, the kernel's `post_init` (repacking
    for Marlin, the scratch for ExLlama).

    `TorchLinear.post_init` normally wraps the dequantization in `torch.compile`; that is skipped
    (`optimized`), since on CPU it costs seconds per module on first use and recompiles per instance.
    `device`: where the module goes first (default: where its `qweight` is).
    """
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    device = torch.device(device) if device is not None else module.qweight.device
    _materialize_runtime_buffers(module, device)
    module.to(device)
    if kernel not in V1_KERNELS and module.qzero_format() == 1:
        convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
    module.to(dtype)
    module.optimized = True
    if kernel == "exllama":  # GPU only
        if scratch is None:
            raise ValueError("an exllama module needs the stage's ExllamaScratch")
        module.post_init(scratch_space=scratch.space)
    else:                    # torch; triton, marlin: GPU only
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
