"""Timing real modules: one decoder layer of a model's architecture (random weights), its embedding and head.

- Modules are built from the HF config on the `meta` device (a one-layer model, so nothing of the full
  model is allocated) and only the parts timed are materialised, with random weights.
- Quantized bit-widths replace every linear of the layer by the GPTQModel module of the weight kernel
  being timed (`torch`: `TorchLinear`; on a GPU also `triton`, `exllama`, `marlin`), built and finalized
  by the same code as the runtime's loader (`llmpq.quantize.gptq_layout`) from random packed codes.
  `TorchLinear` runs eagerly: its `torch.compile` of the dequantization is skipped (it costs 3–30 s per
  shape on a CPU and falls back to eager after a few recompiles), so a profile measures the eager kernel.
- The KV cache is preallocated (`PreallocatedKV`): a decode step at context c appends one token to c − 1
  cached ones and attends over c keys, without growing or copying the cache.
- Clocks: `time.perf_counter_ns` (monotonic) per call on a CPU, with `torch.set_num_threads(threads)`
  fixed; CUDA events around each call on a GPU.
- A grid is timed in interleaved passes (`measure_interleaved`), so that load from other processes on a
  shared machine spreads over all points; each point keeps the median and p10/p90 of its passes.
"""

from __future__ import annotations

import copy
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from llmpq.models.families import family
from llmpq.models.shape import decoder_layers, layer_linears
from llmpq.quantize.gptq_layout import ExllamaScratch, exllama_scratch_bytes, finalize_qlinear, new_qlinear
from llmpq.quantize.settings import LinearQuant


@dataclass(frozen=True)
class Timing:
    """Per-call latency over `repeats` timed calls (after warm-up), in ms."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Fix torch's intra-op thread count for the block (CPU timing), then restore it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device, clock: str = "wall") -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed one by one; median and p10/p90 (ms)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = _timer(device, clock)(fn, repeats)
    return _summary(times)


def measure_interleaved(makers: Sequence[Callable[[], Callable[[], Any]]], *, warmup: int, repeats: int,
                        device: torch.device, min_time_ms: float = 0.0, max_repeats: int | None = None,
                        seed: int = 0, on_done: Callable[[int], None] | None = None,
                        clock: str = "wall") -> list[Timing]:
    """Time many points in interleaved passes; each pass visits every unfinished point once, shuffled.

    A visit builds the point's inputs (`makers[i]()` returns the call) and times one call; the first visit
    runs `warmup` untimed calls before it (one-time costs: kernel selection, allocator growth). Later visits
    are not re-warmed: like a layer in a pipeline stage, a point runs after other work has evicted its
    weights from the caches. A point is finished after `repeats` visits once its timed calls add up to
    `min_time_ms` (short calls get more samples, as their relative noise is larger), or after
    `max_repeats` visits. Each point's samples are spread over the whole run, so a burst of load from other
    processes falls on all points alike instead of skewing a few; one point's buffers live at a time.
    `on_done(n)` is told how many points finished in each pass (for a progress bar). `clock`: see `_timer`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cap = max(repeats, max_repeats or repeats)
    rng = random.Random(seed)
    samples: list[list[float]] = [[] for _ in makers]
    timer = _timer(device, clock)

    def finished(i: int) -> bool:
        n = len(samples[i])
        return n >= cap or (n >= repeats and sum(samples[i]) >= min_time_ms)

    with torch.inference_mode():
        active = list(range(len(makers)))
        while active:
            rng.shuffle(active)
            for i in active:
                fn = makers[i]()
                for _ in range(warmup if not samples[i] else 0):
                    fn()
                samples[i].extend(timer(fn, 1))
                del fn
            still = [i for i in active if not finished(i)]
            if on_done is not None:
                on_done(len(active) - len(still))
            active = sorted(still)
    return [_summary(s) for s in samples]


def _summary(times: Sequence[float]) -> Timing:
    arr = np.asarray(times)
    return Timing(float(np.median(arr)), float(np.percentile(arr, 10)), float(np.percentile(arr, 90)), len(arr))


CLOCKS = ("wall", "thread_cpu")


def _timer(device: torch.device, clock: str) -> Callable[[Callable[[], Any], int], list[float]]:
    """The per-call timer: CUDA events on a GPU; on a CPU the monotonic wall clock (`wall`, the default) or
    the calling thread's CPU time (`thread_cpu`: excludes time the OS gives other processes; valid only
    with one torch thread, where every op runs on the calling thread)."""
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r} (known: {', '.join(CLOCKS)})")
    if device.type == "cuda":
        return _cuda_times
    if clock == "thread_cpu":
        if torch.get_num_threads() != 1:
            raise ValueError(f"clock thread_cpu needs one torch thread, have {torch.get_num_threads()}")
        return lambda fn, repeats: _cpu_times(fn, repeats, time.thread_time_ns)
    return _cpu_times


def _cpu_times(fn: Callable[[], Any], repeats: int, now: Callable[[], int] = time.perf_counter_ns) -> list[float]:
    out = []
    for _ in range(repeats):
        start = now()
        fn()
        out.append((now() - start) / 1e6)
    return out


def _cuda_times(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(float(start.elapsed_time(end)))
    return out


class PreallocatedKV:
    """A one-layer KV cache preallocated for `max_len` tokens; `update` writes in place and returns the
    filled prefix (the interface HF attention modules call)."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def reset(self, length: int) -> None:
        """Pretend `length` tokens are cached (their values do not matter for timing)."""
        self.length = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        new = key_states.shape[-2]
        end = self.length + new
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def one_layer_model(hf_config: Mapping[str, Any]) -> torch.nn.Module:
    """The model's architecture with one decoder layer, on the `meta` device (no memory), sdpa attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(hf_config)
    fam = family(data.get("model_type"))
    data[fam.layers_key] = 1
    cfg = AutoConfig.for_model(**data)
    cfg._attn_implementation = fam.attention
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Allocate `module` (a meta submodule) on `device` in `dtype` with random weights: N(0, 0.02) matrices,
    unit norm scales, zero biases."""
    module = module.to_empty(device=device).to(dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.zero_()
    return module.eval()


def random_quantized_linear(linear: torch.nn.Linear, bits: int, group_size: int, device: torch.device,
                            seed: int = 0, kernel: str = "torch", dtype: torch.dtype | None = None,
                            scratch: ExllamaScratch | None = None) -> torch.nn.Module:
    """The `kernel` module of `linear`'s shape at `bits` (symmetric GPTQ, v1 layout), random packed codes, finalized
    for the device like a loaded layer (`gptq_layout.finalize_qlinear`; `dtype`: the compute dtype)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, torch.get_num_threads())))
    inf, outf = linear.in_features, linear.out_features
    group = group_size if group_size > 0 else inf
    dtype = dtype or linear.weight.dtype
    q = LinearQuant(bits=bits, group_size=group, sym=True, desc_act=False)
    with torch.device("meta"):
        module = new_qlinear(q, inf, outf, linear.bias is not None, kernel, dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    state = {}
    for name, t in module.state_dict().items():
        if name == "g_idx":
            state[name] = torch.arange(inf, dtype=torch.int32) // group
        elif t.dtype == torch.int32:
            state[name] = torch.randint(-2**31, 2**31 - 1, t.shape, generator=gen, dtype=torch.int64).to(torch.int32)
        elif name == "scales":
            state[name] = (torch.rand(t.shape, generator=gen) * 1e-3 + 1e-4).to(torch.float16)
        else:
            state[name] = torch.zeros(t.shape, dtype=torch.float16)
    module.load_state_dict(state, strict=True, assign=True)
    return finalize_qlinear(module, dtype, kernel, scratch, device)


def quantize_randomly(layer: torch.nn.Module, bits: int, group_size: int, device: torch.device,
                      kernel: str = "torch") -> torch.nn.Module:
    """A copy of `layer` with every linear replaced by a random `kernel` module at `bits` (16: the layer itself)."""
    if bits >= 16:
        return layer
    out = copy.deepcopy(layer)
    linears = layer_linears(layer)
    dtype = next(layer.parameters()).dtype
    scratch = None
    if kernel == "exllama":  # GPU only
        scratch = ExllamaScratch(exllama_scratch_bytes([(m.in_features, m.out_features) for m in linears.values()]),
                                 device)
    for i, (name, lin) in enumerate(linears.items()):
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, random_quantized_linear(lin, bits, group_size, device, seed=i, kernel=kernel,
                                                       dtype=dtype, scratch=scratch))
    out.scratch = scratch
    return out


@dataclass(frozen=True)
class ModelParts:
    """What the profiler times: one decoder layer, the embedding step and the head step of a model."""

    family: str
    layer: torch.nn.Module
    embed: Callable[[torch.Tensor], torch.Tensor]       # token ids [b, q] -> hidden [b, q, h]
    head: Callable[[torch.Tensor], torch.Tensor]        # hidden [b, q, h] -> next token ids [b]
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int


def build_parts(hf_config: Mapping[str, Any], device: torch.device, dtype: torch.dtype, *, layer: bool = True,
                ends: bool = True) -> ModelParts:
    """Materialise the decoder layer (if `layer`) and the embedding and head modules (if `ends`)."""
    model = one_layer_model(hf_config)
    cfg, model_type = model.config, model.config.model_type
    heads = cfg.num_attention_heads          # BloomConfig maps it to n_head
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    the_layer = materialize(decoder_layers(model)[0], device, dtype) if layer else torch.nn.Identity()
    embed, head = _ends(model, model_type, device, dtype) if ends else (_missing, _missing)
    return ModelParts(model_type, the_layer, embed, head, heads, kv_heads, head_dim, hidden, cfg.vocab_size)


def _missing(_: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("embedding and head were not built")


def _ends(model: torch.nn.Module, family_name: str, device: torch.device, dtype: torch.dtype):
    """Per-family embedding step (ids -> hidden) and head step (last position -> greedy token)."""
    tokens = materialize(model.get_input_embeddings(), device, dtype, seed=1)
    lm_head = materialize(model.get_output_embeddings(), device, dtype, seed=2)
    position = family(family_name).position
    if position == "learned":
        dec = model.model.decoder
        positions = materialize(dec.embed_positions, device, dtype, seed=3)
        project_in = materialize(dec.project_in, device, dtype) if dec.project_in is not None else None
        project_out = materialize(dec.project_out, device, dtype) if dec.project_out is not None else None
        norm = materialize(dec.final_layer_norm, device, dtype) if dec.final_layer_norm is not None else None

        def embed(ids: torch.Tensor) -> torch.Tensor:
            x = tokens(ids)
            if project_in is not None:
                x = project_in(x)
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            return x + positions.weight[pos + positions.offset]
    elif position == "alibi":
        ln = materialize(model.transformer.word_embeddings_layernorm, device, dtype)
        norm, project_out = materialize(model.transformer.ln_f, device, dtype), None

        def embed(ids: torch.Tensor) -> torch.Tensor:
            return ln(tokens(ids))
    else:
        norm, project_out = materialize(model.model.norm, device, dtype), None

        def embed(ids: torch.Tensor) -> torch.Tensor:
            return tokens(ids)

    def head(hidden: torch.Tensor) -> torch.Tensor:
        x = hidden[:, -1:]
        if norm is not None:
            x = norm(x)
        if project_out is not None:
            x = project_out(x)
        return lm_head(x).float().argmax(dim=-1)

    return embed, head


def layer_call(parts: ModelParts, layer: torch.nn.Module, batch: int, q_tokens: int, context_len: int,
               device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A closure running `layer` once on b sequences of q new tokens over a context of c keys (c >= q)."""
    if context_len < q_tokens:
        raise ValueError(f"context_len {context_len} < q_tokens {q_tokens}")
    x = torch.randn(batch, q_tokens, parts.hidden, dtype=dtype, device=device)
    cache = PreallocatedKV(batch, parts.kv_heads, context_len, parts.head_dim, dtype, device)
    cached = context_len - q_tokens
    pos = torch.arange(cached, context_len, device=device).expand(batch, q_tokens)
    kwargs: dict[str, Any] = {}
    position = family(parts.family).position
    if position == "alibi":
        kwargs["alibi"] = torch.zeros(batch * parts.heads, 1, context_len, dtype=dtype, device=device)
        mask = torch.zeros(batch, 1, q_tokens, context_len, dtype=dtype, device=device)
        if q_tokens > 1:
            mask += torch.full((q_tokens, context_len), float("-inf"), dtype=dtype, device=device).triu(cached + 1)
        kwargs["attention_mask"] = mask
    else:
        kwargs["position_ids"] = pos
    if position == "rotary":
        cos = torch.rand(batch, q_tokens, parts.head_dim, dtype=dtype, device=device)
        kwargs["position_embeddings"] = (cos, torch.rand_like(cos))
    cache_key = "layer_past" if position == "alibi" else "past_key_values"

    def run() -> torch.Tensor:
        cache.reset(cached)
        return layer(x, use_cache=True, **{cache_key: cache}, **kwargs)

    return run


def embed_call(parts: ModelParts, batch: int, q_tokens: int, device: torch.device) -> Callable[[], torch.Tensor]:
    ids = torch.randint(0, parts.vocab, (batch, q_tokens), device=device)
    return lambda: parts.embed(ids)


def head_call(parts: ModelParts, batch: int, device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    hidden = torch.randn(batch, 1, parts.hidden, dtype=dtype, device=device)
    return lambda: parts.head(hidden)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers a module holds (what it allocates)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
