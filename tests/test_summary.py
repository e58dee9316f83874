"""The summary page: the table, and a paragraph that explains the winner from the plans (or says they are equal)."""

import copy

import pytest

from llmpq.evaluate.summary import bits_text, partition_text, same_plan, table_html, why_paragraph


def plan(bits_per_stage, devices=("cpu-large", "cpu-small"), b_p=4, b_d=4):
    stages, start = [], 0
    for device, bits in zip(devices, bits_per_stage):
        stages.append({"device": device, "layers": [start, start + len(bits)], "bits": list(bits)})
        start += len(bits)
    return {"stages": stages, "micro_batch": {"prefill": b_p, "decode": b_d}}


def row(method, measured, ppl=24.1):
    return {"method": method, "measured_tok_s": measured, "predicted_tok_s": measured * 1.2, "perplexity": ppl,
            "omega": 0.0, "ratio_vs_best_baseline": float("nan")}


def test_bits_and_partition_texts():
    p = plan([[16, 16, 16], [8]])
    assert bits_text(p) == "3× 16-bit + 1× 8-bit"
    assert bits_text(plan([[16, 16], [16, 16]])) == "all 16-bit"
    assert partition_text(p) == "3 + 1 layers on cpu-large, cpu-small"


def test_paragraph_names_what_differs():
    plans = {"llmpq": plan([[16, 16, 16], [16]], b_p=3, b_d=4), "uniform": plan([[8, 8], [8, 8]])}
    text = why_paragraph(plans, [row("llmpq", 5000.0), row("uniform", 2500.0)])
    assert "llmpq is the fastest" in text and "2.00× the best baseline, uniform" in text
    assert "bits (all 16-bit against all 8-bit)" in text
    assert "partition (3 + 1 layers" in text
    assert "micro-batches (b_p = 3, b_d = 4 against b_p = 4, b_d = 4)" in text


def test_identical_plans_are_not_ranked():
    p = plan([[16, 16], [16, 16]])
    plans = {"llmpq": p, "pipeedge": copy.deepcopy(p)}
    assert same_plan(plans["llmpq"], plans["pipeedge"])
    text = why_paragraph(plans, [row("llmpq", 3100.0), row("pipeedge", 3000.0)])
    assert "identical to pipeedge's" in text and "noise" in text


def test_table_formats_and_skips_missing():
    html = table_html([row("llmpq", 5385.6)])
    assert "<td>5,385.6</td>" in html and "<td>24.10</td>" in html
    assert "vs best baseline" not in html and "batch job" not in html  # columns with no value anywhere
    html = table_html([{**row("llmpq", 5385.6), "ratio_vs_best_baseline": 1.5}, row("uniform", 3000.0)])
    assert "vs best baseline" in html and "<td>1.50×</td>" in html and "<td></td>" in html


def result(method, measured, lo, hi, load=float("nan")):
    from llmpq.evaluate.run import MethodResult

    return MethodResult(method, measured, measured * 1.1, 0.0, 0.0, 24.0, 0.0, measured_tok_s_min=lo,
                        measured_tok_s_max=hi, repeats=3, load_factor=load)


def test_identical_plans_under_other_names_are_reported_identical():
    from llmpq.evaluate.run import compare

    p = plan([[16, 16], [16, 16]])
    plans = {"llmpq": p, "uniform": copy.deepcopy(p), "pipeedge": plan([[8, 8], [8, 8]])}
    out = compare([result("llmpq", 3472.0, 3400, 3500), result("uniform", 2426.0, 2400, 2500),
                   result("pipeedge", 2000.0, 1990, 2010)], plans)
    assert out["llmpq"].identical_to == "uniform" and out["llmpq"].text == "identical plan to uniform"
    assert out["uniform"].identical_to == "llmpq"
    assert out["pipeedge"].identical_to == "" and out["pipeedge"].text == ""


def test_llmpq_configurations_sharing_a_plan_are_still_ranked_against_the_baselines():
    from llmpq.evaluate.run import compare

    p = plan([[16, 16], [16, 16]], b_p=2)
    plans = {"llmpq": p, "llmpq-vs-adabits": copy.deepcopy(p), "uniform": plan([[8, 8], [8, 8]])}
    out = compare([result("llmpq", 5000.0, 4900, 5100), result("llmpq-vs-adabits", 4000.0, 3900, 4100),
                   result("uniform", 2000.0, 1990, 2010)], plans)
    assert out["llmpq"].text == "2.50x uniform; same plan as llmpq-vs-adabits"
    assert out["llmpq-vs-adabits"].ratio == pytest.approx(2.0) and out["llmpq-vs-adabits"].identical_to == "llmpq"


def test_overlapping_spreads_are_within_noise_and_apart_are_not():
    from llmpq.evaluate.run import compare, summary_markdown

    plans = {"llmpq": plan([[16, 16, 16], [16]], b_p=3), "uniform": plan([[8, 8], [8, 8]])}
    close = compare([result("llmpq", 3100.0, 2900, 3300), result("uniform", 3000.0, 2800, 3150)], plans)
    assert close["llmpq"].within_noise and close["llmpq"].text == "1.03x uniform (within noise)"
    apart = compare([result("llmpq", 5000.0, 4900, 5100), result("uniform", 3000.0, 2900, 3100)], plans)
    assert not apart["llmpq"].within_noise and apart["llmpq"].text == "1.67x uniform"
    text = summary_markdown("t", [result("llmpq", 3100.0, 2900, 3300), result("uniform", 3000.0, 2800, 3150)], close)
    assert "2900–3300 (3)" in text and "within noise" in text
    rows = [{**row("llmpq", 3100.0), "measured_tok_s_min": 2900.0, "measured_tok_s_max": 3300.0},
            {**row("uniform", 3000.0), "measured_tok_s_min": 2800.0, "measured_tok_s_max": 3150.0}]
    assert "within noise" in why_paragraph(plans, rows)


def test_a_loaded_machine_withholds_the_ranking():
    from llmpq.evaluate.run import compare, summary_markdown

    plans = {"llmpq": plan([[16, 16, 16], [16]], b_p=3), "uniform": plan([[8, 8], [8, 8]])}
    results = [result("llmpq", 5000.0, 4900, 5100, load=1.6), result("uniform", 3000.0, 2900, 3100, load=1.1)]
    out = compare(results, plans)
    assert out["llmpq"].text == "withheld: machine loaded (x1.60)"
    assert "ranking is withheld" in summary_markdown("t", results, out)
    rows = [{**row("llmpq", 5000.0), "load_factor": 1.6}, {**row("uniform", 3000.0), "load_factor": 1.1}]
    assert "no ranking is given" in why_paragraph(plans, rows)
    html = table_html([{**row("llmpq", 5000.0), "ratio_vs_best_baseline": 1.67, "comparison": out["llmpq"].text}])
    assert "<td>withheld: machine loaded (x1.60)</td>" in html
