"""Sensitivity: moments over all samples, the variance indicator, layer-by-layer calibrate vs the whole model, ppl_map fit."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

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


def _layer_calls(model, windows, index):
    calls = []
    hook = model.model.decoder.layers[index].register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0] if args else kwargs["hidden_states"],
                                              {k: v for k, v in kwargs.items() if k != "hidden_states"})),
        with_kwargs=True)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
    hook.remove()
    return calls, torch.log_softmax(logits.float(), dim=-1)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.slow
def test_calibrate_tiny_opt(tiny_opt_dir, tmp_path):
    """Every indicator, computed layer by layer, equals the same quantity measured on the whole HF model with
    the stored layer swapped in; ω is 0 at 16 bits and grows as bits drop; the default computes one indicator."""
    from transformers import AutoTokenizer

    from llmpq.quantize import load_quantized_layer
    from llmpq.quantize.calibration import CalibrationSpec, calibration_windows
    from llmpq.quantize.run import QuantizeJob, quantize_store
    from llmpq.quantize.store import layer_file, read_layer_file
    from llmpq.sensitivity.indicators import INDICATORS, linear_steps
    from llmpq.sensitivity.moments import RunningMoments
    from llmpq.sensitivity.run import CalibrateJob, calibrate, write_sensitivity
    from llmpq.sensitivity.table import read_omega

    calibration = CalibrationSpec("shakespeare", 12, 96)
    for bits in (16, 8, 4, 2):
        quantize_store(QuantizeJob("tiny-opt", tiny_opt_dir, tmp_path / f"rtn-w{bits}", "rtn", bits, 128),
                       progress=False)
    job = CalibrateJob("tiny-opt", tiny_opt_dir, tmp_path, "rtn", (16, 8, 4, 2), calibration, INDICATORS,
                       end_to_end_samples=5)
    rows = calibrate(job, progress=False)
    layers = json.loads((Path(tiny_opt_dir) / "config.json").read_text())["num_hidden_layers"]
    assert len(rows) == layers * 4 * len(INDICATORS)
    path = write_sensitivity(rows, tmp_path / "tiny-opt.parquet", {})
    omega = {name: read_omega(path, name) for name in INDICATORS}
    for name in ("variance", "output_error", "kl"):
        for i in range(layers):
            assert omega[name][(i, 16)] == 0.0
            assert 0 < omega[name][(i, 8)] < omega[name][(i, 4)] < omega[name][(i, 2)]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_opt_dir), dtype=torch.float32).eval()
    windows = calibration_windows(AutoTokenizer.from_pretrained(str(tiny_opt_dir)), calibration)
    index, bits = 1, 2
    calls, reference = _layer_calls(model, windows, index)
    original = model.model.decoder.layers[index]
    quantized = load_quantized_layer(model.config, tmp_path / f"rtn-w{bits}", index)
    num = den = 0.0
    moments = {name: RunningMoments(m.in_features) for name, m in original.named_modules()
               if isinstance(m, torch.nn.Linear)}
    hooks = [original.get_submodule(name).register_forward_pre_hook(lambda m, a, s=stats: s.update(a[0]))
             for name, stats in moments.items()]
    with torch.no_grad():
        for hidden, kwargs in calls:
            want, got = _first(original(hidden, **kwargs)), _first(quantized(hidden, **kwargs))
            num += float((got.double() - want.double()).pow(2).sum())
            den += float(want.double().pow(2).sum())
    for hook in hooks:
        hook.remove()
    assert omega["output_error"][(index, bits)] == pytest.approx(num / den, rel=1e-4)
    assert moments["fc1"].count == windows.numel()
    header, tensors = read_layer_file(layer_file(tmp_path / f"rtn-w{bits}", index))
    expected = variance_omega(linear_steps(header, tensors), {n: m.variance() for n, m in moments.items()})
    assert omega["variance"][(index, bits)] == pytest.approx(expected, rel=1e-6)
    model.model.decoder.layers[index] = quantized
    first = windows[:5]                           # kl and loss_delta use the first end_to_end_samples windows
    with torch.no_grad():
        log_q = torch.log_softmax(model(input_ids=first, use_cache=False).logits.float(), dim=-1)
    reference = reference[:5]
    kl = float((reference.exp() * (reference - log_q)).sum()) / first.numel()
    assert omega["kl"][(index, bits)] == pytest.approx(kl, rel=1e-3)
    default = calibrate(CalibrateJob("tiny-opt", tiny_opt_dir, tmp_path, "rtn", (16, 4), calibration), progress=False)
    assert {r.indicator for r in default} == {"output_error", "bits_only"}
    assert {(r.layer, r.bits): r.omega for r in default if r.indicator == "output_error"}[(index, 4)] == \
        pytest.approx(omega["output_error"][(index, 4)], rel=1e-9)


def test_calibrate_computes_the_planner_indicator_only():
    from llmpq.config import compose_experiment
    from llmpq.sensitivity.ppl_map import configured_indicator
    from llmpq.sensitivity.run import requested_indicators

    assert configured_indicator(compose_experiment([])) == "output_error"
    assert configured_indicator(compose_experiment(["sensitivity.indicator=variance"])) == "variance"
    assert configured_indicator(compose_experiment(["model=smollm2-135m"])) == "kl"      # the model's own choice
    assert requested_indicators(None, "output_error") == ("output_error", "bits_only")
    assert requested_indicators(None, "kl") == ("kl", "output_error", "loss_delta", "bits_only")
    assert requested_indicators("variance", "kl") == ("variance", "bits_only")
    assert requested_indicators("all", "kl") == ("variance", "output_error", "kl", "loss_delta", "bits_only")
