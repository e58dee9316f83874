"""Sensitivity: moments over all samples, the variance indicator, calibration capture, ppl_map fit."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from llmpq.sensitivity.capture import capture
from llmpq.sensitivity.indicators import variance_omega
from llmpq.sensitivity.moments import RunningMoments
from llmpq.sensitivity.ppl_map import fit_ppl_map, load_ppl_map, random_assignments


def test_variance_indicator_accumulates_every_sample():
    """Two samples of two tokens, two input channels; a 1-output linear with steps 0.5 and 1.0.

    Over all four tokens channel 0 is (1, 3, 5, 7): variance 5; channel 1 is (0, 0, 2, 2): variance 1.
    ω = 0.5²·5 + 1²·1 = 2.25. The last sample alone, (5, 7) and (2, 2), would give 0.25·1 + 0 = 0.25.
    """
    moments = RunningMoments(2)
    moments.update(torch.tensor([[[1.0, 0.0], [3.0, 0.0]]]))
    moments.update(torch.tensor([[[5.0, 2.0], [7.0, 2.0]]]))
    assert moments.count == 4
    assert moments.variance().tolist() == [5.0, 1.0]
    steps = {"fc": torch.tensor([[0.5, 1.0]])}
    assert variance_omega(steps, {"fc": moments.variance()}) == pytest.approx(2.25)


def test_capture_sees_all_calibration_tokens(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=32,
                                     dropout=0.0)).eval()
    windows = torch.randint(0, 64, (5, 12))
    cap = capture(model, windows, batch=2)
    assert len(cap.batches) == 3 and [len(c) for c in cap.calls] == [3, 3]
    fc1 = cap.moments[1]["fc1"]
    assert fc1.count == 5 * 12
    inputs = []
    handle = model.model.decoder.layers[1].fc1.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    everything = inputs[0].reshape(-1, 32).double()
    assert torch.allclose(fc1.variance(), everything.var(0, unbiased=False), rtol=1e-6, atol=1e-9)
    layer = model.model.decoder.layers[0]
    call = cap.calls[0][1]
    with torch.no_grad():
        replay = layer(call.hidden, **call.kwargs)
    replay = replay[0] if isinstance(replay, tuple) else replay
    assert torch.equal(replay, call.output)


def _noisy_points(seed: int = 0) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    return [(w, 3.0 * w + rng.gauss(0, 0.4)) for w in (rng.uniform(0.01, 5) for _ in range(30))]


def test_ppl_map_is_monotone_and_budget_inverts_predict(tmp_path):
    fitted = fit_ppl_map(_noisy_points(), "m", "kl")
    grid = [i * 0.05 for i in range(200)]
    predictions = [fitted.predict(w) for w in grid]
    assert fitted.predict(0.0) == 0.0
    assert all(b >= a for a, b in zip(predictions, predictions[1:]))
    for pct in (0.0, 0.5, 1.0, 5.0, 14.0, 40.0):
        budget = fitted.omega_budget(pct)
        assert fitted.predict(budget) == pytest.approx(pct, abs=1e-9)
        assert fitted.predict(budget * 1.001 + 1e-9) >= pct
    for w in (0.3, 2.0, 7.5):
        assert fitted.omega_budget(fitted.predict(w)) >= w - 1e-9
    path = tmp_path / "m.ppl_map.json"
    path.write_text(json.dumps(fitted.to_json()))
    loaded = load_ppl_map(path)
    assert loaded.indicator == "kl" and loaded.predict(1.234) == pytest.approx(fitted.predict(1.234))
    flat = fit_ppl_map([(1.0, -2.0), (2.0, 0.0)], "m", "kl")
    assert flat.omega_budget(1.0) == math.inf and flat.predict(5.0) == 0.0
    with pytest.raises(ValueError, match="malformed ppl_map"):
        (tmp_path / "bad.json").write_text("{}")
        load_ppl_map(tmp_path / "bad.json")


def test_random_assignments_are_distinct_and_use_prepared_bits():
    plans = random_assignments(8, [16, 8, 4, 3, 2], 20, seed=1)
    assert len(set(plans)) == 20
    assert all(len(p) == 8 and set(p) <= {16, 8, 4, 3, 2} and min(p) < 16 for p in plans)


@pytest.mark.slow
def test_calibrate_tiny_opt(tiny_opt_dir, tmp_path):
    """All indicators on the real quantized layers: complete, zero at 16 bits, growing as bits drop."""
    from llmpq.quantize.calibration import CalibrationSpec
    from llmpq.quantize.run import QuantizeJob, quantize_store
    from llmpq.sensitivity.indicators import INDICATORS
    from llmpq.sensitivity.run import CalibrateJob, calibrate, write_sensitivity
    from llmpq.sensitivity.table import read_omega

    calibration = CalibrationSpec("shakespeare", 16, 128)
    for bits in (16, 8, 4, 2):
        quantize_store(QuantizeJob("tiny-opt", tiny_opt_dir, tmp_path / f"rtn-w{bits}", "rtn", bits, 128),
                       progress=False)
    rows = calibrate(CalibrateJob("tiny-opt", tiny_opt_dir, tmp_path, "rtn", (16, 8, 4, 2), calibration), progress=False)
    layers = json.loads((Path(tiny_opt_dir) / "config.json").read_text())["num_hidden_layers"]
    assert len(rows) == layers * 4 * len(INDICATORS)
    path = write_sensitivity(rows, tmp_path / "tiny-opt.parquet", {})
    for name in ("variance", "output_error", "kl"):
        omega = read_omega(path, name)
        for i in range(layers):
            assert omega[(i, 16)] == 0.0
            assert 0 < omega[(i, 8)] < omega[(i, 4)] < omega[(i, 2)]
