"""Perplexity over held-out text with fixed windows and stride, and the `llmpq ppl` verb.

Windows start every `stride` tokens and hold up to `window` tokens; the last one may be shorter (it is
evaluated, not dropped). Each token is scored once: window w scores its positions from the end of the
previous window on (with `stride < window` the overlap is context only), and a window's first token,
which has no context in it, is never a target. Perplexity = exp(Σ NLL / scored tokens). Only
`max_windows` windows are evaluated when given; the result records how many tokens that covered.

A model's own weights and its per-layer stores are evaluated layer by layer (`StoreEvaluator`: all
windows through one decoder layer at a time, so memory is the embedding, the head, one layer and the
windows' hidden states); quantized layers run as dense matmuls of their exact dequantized weights
(`densify`), so a plan's perplexity is that of the deployed weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..artifacts import write_text
from ..progress import bar
from ..quantize.loader import store_name
from ..quantize.store import read_manifest
from ..quantize.stream import LayerStream


class NonFiniteLossError(ValueError):
    """The model produced a NaN or infinite loss; the message names the window."""


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) fed to the model, of which positions [score_from, end) are scored."""

    start: int
    end: int
    score_from: int


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and what it was measured on."""

    perplexity: float
    nll_per_token: float       # mean negative log-likelihood, nats per scored token
    scored_tokens: int
    windows: int
    window: int
    stride: int
    total_tokens: int          # tokens in the text; the windows cover the first `covered_tokens`
    covered_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_windows(n_tokens: int, window: int, stride: int, max_windows: int | None = None) -> list[Window]:
    """The windows that cover `n_tokens` (see the module docstring), at most `max_windows` of them."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}")
    windows: list[Window] = []
    scored_to, start = 1, 0
    while scored_to < n_tokens and (max_windows is None or len(windows) < max_windows):
        end = min(start + window, n_tokens)
        windows.append(Window(start, end, max(start + 1, scored_to)))
        scored_to, start = end, start + stride
    return windows


def window_nll(logits: torch.Tensor, ids: torch.Tensor, w: Window, index: int) -> float:
    """Summed NLL (nats) of the scored positions of one window; `logits` [len, vocab], `ids` [len]."""
    lo, hi = w.score_from - w.start, w.end - w.start
    logp = torch.log_softmax(logits[lo - 1 : hi - 1].float(), dim=-1)
    nll = -logp.gather(-1, ids[lo:hi, None]).sum().item()
    if not math.isfinite(nll):
        raise NonFiniteLossError(f"window {index} (tokens {w.start}..{w.end}): loss is {nll}")
    return nll


@torch.no_grad()
def perplexity(model: torch.nn.Module, token_ids: Sequence[int] | torch.Tensor, window: int, stride: int,
               max_windows: int | None = None, batch: int = 8, progress: bool = False) -> PerplexityResult:
    """Perplexity of a causal LM on `token_ids` with fixed windows and stride (module docstring).

    Raises NonFiniteLossError naming the first window whose loss is NaN or infinite.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    windows = plan_windows(len(ids), window, stride, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, scored = 0.0, 0
    try:
        for first in bar(range(0, len(windows), batch), desc="perplexity", unit="batches", disable=not progress):
            group = list(enumerate(windows[first : first + batch], start=first))
            for length in sorted({w.end - w.start for _, w in group}, reverse=True):
                same = [(i, w) for i, w in group if w.end - w.start == length]
                chunk = torch.stack([ids[w.start : w.end] for _, w in same]).to(device)
                logits = model(input_ids=chunk).logits
                for (i, w), row_logits, row_ids in zip(same, logits, chunk):
                    total += window_nll(row_logits, row_ids, w, i)
                    scored += w.end - w.score_from
    finally:
        model.train(was_training)
    nll = total / scored
    return PerplexityResult(math.exp(nll), nll, scored, len(windows), window, stride, len(ids), windows[-1].end)


@dataclass(frozen=True)
class EvalSpec:
    """The `eval:` config slice: which text and how it is windowed."""

    source: str = "shakespeare"
    window: int = 128
    stride: int = 128
    max_windows: int | None = 64

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> "EvalSpec":
        limit = raw.get("max_windows")
        return cls(str(raw["source"]), int(raw["window"]), int(raw["stride"]), int(limit) if limit else None)


def eval_token_ids(model_dir: str | Path, spec: EvalSpec) -> torch.Tensor:
    """The eval split of `spec.source`, tokenized with the model's tokenizer (no special tokens)."""
    from transformers import AutoTokenizer

    from ..data.text import encode_split

    return torch.tensor(encode_split(spec.source, "eval", AutoTokenizer.from_pretrained(str(model_dir))))


@dataclass(frozen=True)
class PlanBits:
    """What perplexity needs of a plan: the bits of every layer, in order, and the quantization scheme."""

    bits: tuple[int, ...]
    scheme: str
    dtype: str = "float32"   # the plan's compute dtype (plans that record none ran in float32 on CPUs)


def read_plan_bits(path: str | Path) -> PlanBits:
    """Per-layer bits of a plan JSON (`stages[].layers` [start, end), `stages[].bits`) and `quant.scheme`."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: plan not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    bits: list[int] = []
    for k, stage in enumerate(plan.get("stages") or []):
        try:
            start, end = (int(x) for x in stage["layers"])
            stage_bits = [int(b) for b in stage["bits"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: stages[{k}]: needs layers [start, end] and bits [per layer]") from None
        if start != len(bits) or len(stage_bits) != end - start:
            raise ValueError(f"{path}: stages[{k}]: layers {[start, end]} with {len(stage_bits)} bits do not "
                             f"continue from layer {len(bits)}")
        bits.extend(stage_bits)
    if not bits:
        raise ValueError(f"{path}: stages: no layers")
    scheme = (plan.get("quant") or {}).get("scheme")
    if not scheme:
        raise ValueError(f"{path}: quant.scheme: missing")
    return PlanBits(tuple(bits), str(scheme), str(plan.get("dtype") or "float32"))


@torch.no_grad()
def layerwise_perplexity(stream: Any, token_ids: Sequence[int] | torch.Tensor, window: int, stride: int,
                         max_windows: int | None, layer: Callable[[int], torch.nn.Module],
                         hidden: dict[int, torch.Tensor] | None = None) -> PerplexityResult:
    """Perplexity (module docstring) with `stream` (a `LayerStream` with its head) and `layer(i)` loading
    decoder layer i; `hidden`: the windows' embeddings by window length, if already computed."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    windows = plan_windows(len(ids), window, stride, max_windows)
    groups = window_groups(windows)
    states = dict(hidden) if hidden is not None else embed_windows(stream, ids, windows)
    for index in range(stream.num_layers):
        module = layer(index)
        states = {length: stream.forward(module, index, h) for length, h in states.items()}
        del module
    total, scored = 0.0, 0
    for length, members in groups.items():
        rows = torch.stack([ids[w.start : w.end] for _, w in members])
        for first in range(0, len(members), stream.batch):
            logits = stream.logits(states[length][first : first + stream.batch])
            for (i, w), row_logits, row_ids in zip(members[first : first + stream.batch], logits, rows[first:]):
                total += window_nll(row_logits, row_ids.to(row_logits.device), w, i)
                scored += w.end - w.score_from
    nll = total / scored
    return PerplexityResult(math.exp(nll), nll, scored, len(windows), window, stride, len(ids), windows[-1].end)


def window_groups(windows: Sequence[Window]) -> dict[int, list[tuple[int, Window]]]:
    """Windows (with their index) grouped by length, longest first (all but the last are full length)."""
    groups: dict[int, list[tuple[int, Window]]] = {}
    for i, w in enumerate(windows):
        groups.setdefault(w.end - w.start, []).append((i, w))
    return dict(sorted(groups.items(), reverse=True))


def embed_windows(stream: Any, ids: torch.Tensor, windows: Sequence[Window]) -> dict[int, torch.Tensor]:
    """The embeddings of every window, stacked per window length."""
    return {length: stream.embed(torch.stack([ids[w.start : w.end] for _, w in members]))
            for length, members in window_groups(windows).items()}


DENSE_CACHE_GIB = 1.0


class StoreEvaluator:
    """Perplexity of a model and of per-layer bit assignments from its stores, one layer at a time.

    The embedding, the head and the eval windows' embeddings are loaded once; every evaluation then reads
    its layers from the checkpoint (`fp`) or from `quant_root/{scheme}-w{bits}/` (sha256-verified).
    Dequantized layers are kept for later plans up to `cache_gib` (first come; dequantizing costs about
    as much as running a layer over 1,000 tokens on a CPU), so memory is bounded by it plus one layer.
    """

    def __init__(self, model_dir: str | Path, spec: "EvalSpec", quant_root: str | Path | None = None,
                 scheme: str = "gptq", token_ids: torch.Tensor | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, cache_gib: float = DENSE_CACHE_GIB):
        self.spec, self.scheme = spec, scheme
        self._dense: dict[tuple[int, int], torch.nn.Module] = {}
        self._cache_left = int(cache_gib * 1024**3)
        self.quant_root = Path(quant_root) if quant_root is not None else None
        self.stream = LayerStream(model_dir, head=True, device=device, dtype=dtype)
        self.ids = token_ids if token_ids is not None else eval_token_ids(model_dir, spec)
        windows = plan_windows(len(self.ids), spec.window, spec.stride, spec.max_windows)
        self.hidden = embed_windows(self.stream, torch.as_tensor(self.ids, dtype=torch.long).flatten(), windows)
        self._manifests: dict[int, Any] = {}

    @property
    def num_layers(self) -> int:
        return self.stream.num_layers

    def _run(self, layer: Callable[[int], torch.nn.Module]) -> PerplexityResult:
        return layerwise_perplexity(self.stream, self.ids, self.spec.window, self.spec.stride, self.spec.max_windows,
                                    layer, self.hidden)

    def fp(self) -> PerplexityResult:
        """The model with the checkpoint's own weights."""
        return self._run(self.stream.fp_layer)

    def plan(self, bits_per_layer: Sequence[int]) -> PerplexityResult:
        """The model with layer i read from the store of `bits_per_layer[i]`."""
        if self.quant_root is None:
            raise ValueError("quant_root is needed to evaluate quantized layers")
        if len(bits_per_layer) != self.num_layers:
            raise ValueError(f"{len(bits_per_layer)} bit-widths given for a model of {self.num_layers} decoder layers")
        stores = {}
        for bits in sorted(set(int(b) for b in bits_per_layer)):
            store = self.quant_root / store_name(self.scheme, bits)
            if not store.is_dir():
                raise FileNotFoundError(f"{store}: no quantized store (run `llmpq quantize bits={bits}` with scheme "
                                        f"{self.scheme})")
            if bits not in self._manifests:
                self._manifests[bits] = read_manifest(store)
            stores[bits] = store
        return self._run(lambda i: self._stored(stores[int(bits_per_layer[i])], i, int(bits_per_layer[i])))

    def _stored(self, store: Path, index: int, bits: int) -> torch.nn.Module:
        if (index, bits) in self._dense:
            return self._dense[(index, bits)]
        layer = self.stream.stored_layer(store, index, self._manifests[bits])
        size = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        if bits < 16 and size <= self._cache_left:
            self._dense[(index, bits)] = layer
            self._cache_left -= size
        return layer


def model_perplexity(model_dir: str | Path, spec: EvalSpec, bits_per_layer: Sequence[int] | None = None,
                     quant_root: str | Path | None = None, scheme: str = "gptq",
                     token_ids: torch.Tensor | None = None, device: str = "cpu",
                     dtype: str = "float32") -> PerplexityResult:
    """Perplexity of the model in `model_dir` (fp) or, with `bits_per_layer`, of its per-layer quantized store, computed
    in `dtype` (a plan's: what its stages compute in) on `device`."""
    if bits_per_layer is not None and quant_root is None:
        raise ValueError("quant_root is needed to evaluate quantized layers")
    evaluator = StoreEvaluator(model_dir, spec, quant_root, scheme, token_ids, device, dtype=getattr(torch, dtype))
    return evaluator.fp() if bits_per_layer is None else evaluator.plan(bits_per_layer)


def cli_ppl(exp: Any, args: Any) -> int:
    """`llmpq ppl model=M [plan=PATH | bits=B] [out=PATH]`: print (and write) the perplexity on the eval split."""
    from ..models.source import model_dir
    from ..paths import quant_root as store_root
    from ..quantize.calibration import quality_device

    weights = model_dir(exp.model, results=args.results)
    if weights is None:
        raise FileNotFoundError(f"model {exp.model.name}: source {exp.model.source!r} is not a local directory with weights")
    if args.plan is not None and args.bits is not None:
        raise ValueError("give plan= or bits=, not both")
    spec = EvalSpec.from_raw(exp.raw["eval"])
    scheme, bits, dtype = exp.model.quant.scheme, None, "float32"
    if args.plan is not None:
        plan = read_plan_bits(args.plan)
        scheme, bits, dtype = plan.scheme, list(plan.bits), plan.dtype
    elif args.bits is not None:
        from ..models.source import model_shape

        bits = [args.bits] * model_shape(exp.model).num_layers
    result = model_perplexity(weights, spec, bits, store_root(args.results, exp.model.name), scheme,
                              device=quality_device(exp), dtype=dtype)
    record = {"model": exp.model.name, "eval": asdict(spec), "scheme": scheme if bits else None,
              "bits_per_layer": bits, "plan": str(args.plan) if args.plan else None, **result.to_dict()}
    print(f"{exp.model.name}: perplexity {result.perplexity:.4f} over {result.scored_tokens} tokens "
          f"({result.windows} windows of {spec.window}, stride {spec.stride})")
    if args.out is not None:
        write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", args.out)
    return 0
