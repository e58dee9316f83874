"""Perplexity evaluator: windowing, NaN detection, equality with HF's loss, ordering of quantized stores."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmpq.evaluate.perplexity import (
    EvalSpec, NonFiniteLossError, eval_token_ids, perplexity, plan_windows, read_plan_bits,
)


@pytest.mark.parametrize("n,window,stride,limit", [(10, 4, 4, None), (11, 4, 2, None), (9, 4, 3, None),
                                                   (4, 8, 8, None), (100, 16, 16, 3), (17, 4, 1, None)])
def test_windows_score_each_token_at_most_once_and_drop_nothing(n, window, stride, limit):
    windows = plan_windows(n, window, stride, limit)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == sorted(set(scored)) and scored[0] == 1
    assert all(w.end - w.start <= window and w.start < w.score_from <= w.end for w in windows)
    if limit is None:
        assert windows[-1].end == n
        context_free = {w.start for w in windows[1:]} if stride == window else set()
        assert set(range(1, n)) - set(scored) == context_free
    else:
        assert len(windows) == limit


class _FakeLM(torch.nn.Module):
    """Uniform logits, NaN for any window that contains token `poison`."""

    def __init__(self, vocab: int = 7, poison: int = -1):
        super().__init__()
        self.vocab, self.poison = vocab, poison
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[(input_ids == self.poison).any(-1)] = float("nan")
        return SimpleNamespace(logits=logits)


def test_uniform_model_has_vocab_perplexity():
    result = perplexity(_FakeLM(vocab=7), torch.arange(50) % 7, window=8, stride=8)
    assert result.perplexity == pytest.approx(7.0)
    assert result.scored_tokens == 50 - result.windows and result.covered_tokens == 50


def test_nan_loss_names_the_window():
    ids = torch.arange(40) % 5
    ids[27] = 6  # in window 3 of windows of 8 tokens
    with pytest.raises(NonFiniteLossError, match=r"window 3 \(tokens 24\.\.32\)"):
        perplexity(_FakeLM(poison=6), ids, window=8, stride=8, batch=2)


def test_read_plan_bits(tmp_path):
    plan = {"quant": {"scheme": "gptq"}, "stages": [{"layers": [0, 2], "bits": [8, 4]}, {"layers": [2, 3], "bits": [16]}]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    bits = read_plan_bits(path)
    assert bits.bits == (8, 4, 16) and bits.scheme == "gptq"
    plan["stages"][1]["layers"] = [3, 4]
    path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"plan\.json: stages\[1\]"):
        read_plan_bits(path)


@pytest.mark.slow
def test_fp_perplexity_equals_exp_of_hf_loss(tiny_opt_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_opt_dir), dtype=torch.float32).eval()
    ids = eval_token_ids(tiny_opt_dir, EvalSpec("shakespeare"))[:128 * 5 + 37]
    result = perplexity(model, ids, window=128, stride=128)
    assert result.windows == 6 and result.covered_tokens == len(ids)
    total = count = 0
    with torch.no_grad():
        for start in range(0, len(ids), 128):
            chunk = ids[start : start + 128][None]
            total += model(input_ids=chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    assert result.scored_tokens == count
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_store_root(tiny_opt_dir, tmp_path_factory) -> Path:
    """GPTQ and RTN stores of tiny-opt at 16, 8, 4, 3 and 2 bits (the workflow's calibration settings)."""
    from llmpq.quantize.calibration import CalibrationSpec
    from llmpq.quantize.run import QuantizeJob, quantize_store

    root = tmp_path_factory.mktemp("quantized")
    calibration = CalibrationSpec("shakespeare", 32, 128)
    for scheme in ("gptq", "rtn"):
        for bits in (16, 8, 4, 3, 2):
            quantize_store(QuantizeJob("tiny-opt", tiny_opt_dir, root / f"{scheme}-w{bits}", scheme, bits, 128,
                                       calibration=calibration), progress=False)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["gptq", "rtn"])
def test_quantized_perplexity_orders_by_bits(tiny_opt_dir, tiny_store_root, scheme):
    """8-bit within 2 % of fp, then > 1 % worse at every step down (tiny-opt, 64 eval windows: GPTQ
    +0.03 / +1.9 / +12 / +87 % and RTN +0.07 / +5.4 / +25 / +340 % at 8 / 4 / 3 / 2 bits)."""
    from llmpq.evaluate.perplexity import model_perplexity

    spec = EvalSpec("shakespeare", 128, 128, 64)
    ids = eval_token_ids(tiny_opt_dir, spec)
    fp = model_perplexity(tiny_opt_dir, spec, token_ids=ids).perplexity
    layers = json.loads((tiny_opt_dir / "config.json").read_text())["num_hidden_layers"]
    ppl = {b: model_perplexity(tiny_opt_dir, spec, [b] * layers, tiny_store_root, scheme, token_ids=ids).perplexity
           for b in (16, 8, 4, 3, 2)}
    assert ppl[16] == pytest.approx(fp, rel=1e-6)
    assert abs(ppl[8] / fp - 1) < 0.02
    assert ppl[4] > ppl[8] * 1.01 and ppl[3] > ppl[4] * 1.01 and ppl[2] > ppl[3] * 1.01


@pytest.mark.slow
def test_layer_by_layer_perplexity_matches_the_whole_model(tiny_opt_dir, tiny_store_root):
    """One layer at a time over all windows (overlapping stride, a short last window) equals the whole HF
    model; a mixed plan's dense dequantized layers equal GPTQModel's quantized modules."""
    from transformers import AutoModelForCausalLM

    from llmpq.evaluate.perplexity import StoreEvaluator
    from llmpq.quantize import load_mixed_model

    ids = eval_token_ids(tiny_opt_dir, EvalSpec("pydoc"))[:128 * 4 + 50]
    spec = EvalSpec("pydoc", 128, 96, None)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_opt_dir), dtype=torch.float32).eval()
    whole = perplexity(model, ids, 128, 96)
    evaluator = StoreEvaluator(tiny_opt_dir, spec, tiny_store_root, "gptq", token_ids=ids)
    streamed = evaluator.fp()
    assert (streamed.windows, streamed.scored_tokens) == (whole.windows, whole.scored_tokens) == (6, len(ids) - 1)
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-6)
    bits = [4, 16, 2, 8]
    mixed = perplexity(load_mixed_model(tiny_opt_dir, tiny_store_root, bits, "gptq"), ids, 128, 96)
    first = evaluator.plan(bits).perplexity
    assert first == pytest.approx(mixed.perplexity, rel=1e-5)
    assert evaluator.plan(bits).perplexity == first          # again, from the dequantized layers kept
    with pytest.raises(ValueError, match="3 bit-widths given for a model of 4"):
        evaluator.plan([4, 4, 4])
