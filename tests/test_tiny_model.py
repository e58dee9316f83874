"""The embedded tiny-opt model: builds atomically, reloads with transformers, learns."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from llmpq.data.text import encode_split
from llmpq.models.tiny import TRAINING_FILE, TinyOptSpec, build_tiny_opt, is_built, window_perplexity

SMALL = TinyOptSpec(
    layers=2,
    hidden=32,
    ffn=64,
    heads=2,
    vocab_size=384,
    max_positions=64,
    steps=6,
    seq_len=32,
    batch=4,
    warmup_steps=2,
    threads=1,
    eval_tokens=1024,
    source="pydoc",
)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_spec_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        TinyOptSpec(hidden=30, heads=4)
    with pytest.raises(ValueError, match="max_positions"):
        TinyOptSpec(seq_len=512, max_positions=256)
    with pytest.raises(ValueError, match="steps"):
        TinyOptSpec(steps=0)


def test_spec_digest_is_stable_and_discriminating():
    assert SMALL.digest() == TinyOptSpec(**SMALL.to_dict()).digest()
    assert SMALL.digest() != TinyOptSpec(**{**SMALL.to_dict(), "seed": 1}).digest()


def test_small_build_reloads_offline_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "tiny"
    report = build_tiny_opt(out, SMALL, progress=False)
    assert is_built(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert out.stat().st_mode & 0o777 == 0o755
    record = json.loads((out / TRAINING_FILE).read_text())
    assert record["spec"] == SMALL.to_dict() and record["spec_digest"] == SMALL.digest()
    assert record["ppl_trained"] == pytest.approx(report.ppl_trained)

    model, tokenizer = _load(out)
    assert model.config.model_type == "opt" and model.config.num_hidden_layers == 2
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == tokenizer.bos_token == "</s>"
    sentence = "To be, or not to be: that is the question."
    assert tokenizer.decode(tokenizer(sentence)["input_ids"]) == sentence
    eval_ids = torch.tensor(encode_split("pydoc", "eval", tokenizer)[: SMALL.eval_tokens])
    assert window_perplexity(model, eval_ids, SMALL.seq_len) == pytest.approx(report.ppl_trained, rel=1e-4)

    weights = _sha256(out / "model.safetensors")
    build_tiny_opt(out, SMALL, progress=False)
    assert _sha256(out / "model.safetensors") == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_failed_build_leaves_nothing(tmp_path):
    bad = TinyOptSpec(**{**SMALL.to_dict(), "seq_len": 64, "source": "no-such-text"})
    with pytest.raises(ValueError, match="unknown text source"):
        build_tiny_opt(tmp_path / "tiny", bad, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_default_model_learns(tiny_opt_dir):
    record = json.loads((tiny_opt_dir / TRAINING_FILE).read_text())
    assert record["spec"] == TinyOptSpec().to_dict()
    assert record["ppl_trained"] < 0.2 * record["ppl_untrained"]
    model, tokenizer = _load(tiny_opt_dir)
    assert model.config.num_hidden_layers == TinyOptSpec().layers
    assert len(tokenizer) == model.config.vocab_size
