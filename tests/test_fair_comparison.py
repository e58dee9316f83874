"""Fair defaults: llmpq's default quality budget, the llmpq-vs-<baseline> configs, and evaluate comparing each llmpq
plan only with baselines of equal or worse quality."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from llmpq.artifacts import schema
from llmpq.config import ConfigError, compose_experiment
from llmpq.config.types import DefaultBudget
from llmpq.costmodel.context import build_context
from llmpq.evaluate.run import MethodResult, compare, infeasible_result, ratio_vs_best_baseline, summary_markdown
from llmpq.evaluate.summary import COLUMNS, table_html, why_paragraph
from llmpq.solve.methods import BASELINES
from llmpq.solve.planner import effective_budget, solve
from llmpq.solve.quality import OmegaTable, proxy_omega

C4 = ["cluster=paper-c4", "model=opt-30b", "workload=s512-n100-b32"]


def result(method, tok_s, omega, ppl=24.0):
    return MethodResult(method=method, measured_tok_s=tok_s, predicted_tok_s=tok_s, prefill_rel_error=0.0,
                        decode_rel_error=0.0, perplexity=ppl, omega=omega, plan_status="optimal")


def test_llmpq_is_compared_only_with_baselines_of_equal_or_worse_quality():
    rows = [result("llmpq", 100.0, 0.5, 24.0), result("uniform-best", 150.0, 0.2, 23.0),  # better quality: excluded
            result("pipeedge", 80.0, 0.7, 25.0), result("adabits", 60.0, 0.5, 24.0)]
    ratios = ratio_vs_best_baseline(rows)
    assert ratios["llmpq"] == (pytest.approx(100 / 80), "pipeedge")
    assert math.isnan(ratios["pipeedge"][0]) and ratios["pipeedge"][1] == ""


def test_measured_perplexity_also_qualifies_a_baseline():
    """A baseline with less Σω but a measured perplexity at least llmpq's is of equal or worse quality."""
    rows = [result("llmpq", 100.0, 0.5, 24.0), result("uniform-best", 90.0, 0.2, 24.5)]
    assert ratio_vs_best_baseline(rows)["llmpq"] == (pytest.approx(100 / 90), "uniform-best")


def test_no_comparable_baseline_gives_no_ratio():
    rows = [result("llmpq", 100.0, 0.9, 30.0), result("uniform-best", 150.0, 0.2, 23.0)]
    ratio, name = ratio_vs_best_baseline(rows)["llmpq"]
    assert math.isnan(ratio) and name == ""
    text = why_paragraph({"uniform-best": {"stages": [{"device": "t4", "layers": [0, 2], "bits": [8, 8]}],
                                           "micro_batch": {"prefill": 4, "decode": 4}}},
                         [{**vars(r), "compared_with": ""} for r in rows])
    assert text.startswith("uniform-best is the fastest")


def test_infeasible_methods_are_listed_without_numbers():
    rows = [result("llmpq", 100.0, 0.5), infeasible_result("uniform", {"infeasible": {"kind": "memory"}}),
            result("pipeedge", 80.0, 0.7)]
    two_stages = {"stages": [{"device": "t4", "layers": [0, 2], "bits": [8, 8]}],
                  "micro_batch": {"prefill": 4, "decode": 4}}
    plans = {"llmpq": two_stages, "pipeedge": {**two_stages, "micro_batch": {"prefill": 2, "decode": 4}}}
    comparisons = compare(rows, plans)
    text = summary_markdown("t", rows, comparisons)
    assert "| uniform | infeasible (memory) |" in text and "1.25x pipeedge" in text
    table = [{**vars(r), "ratio_vs_best_baseline": comparisons[r.method].ratio,
              "compared_with": comparisons[r.method].compared_with} for r in rows]
    html = table_html(table)
    assert "infeasible (memory)" in html and "compared with (equal or worse quality)" in html


def test_summary_columns_are_the_eval_table_columns():
    shown = {c[0] for c in COLUMNS}
    assert shown <= set(schema("eval").names)
    assert {"compared_with", "plan_status", "ratio_vs_best_baseline"} <= shown


def test_llmpq_defaults_to_a_quality_budget():
    spec = compose_experiment(["solver=llmpq"]).solver
    assert spec.default_budget == DefaultBudget(max_ppl_increase=1.0, budget_from="uniform-best")
    omega = OmegaTable((16, 4), [[0.0, 1.0]] * 4, "indicator", "output_error")
    ppl_map = SimpleNamespace(indicator="output_error")
    assert effective_budget(spec, omega, ppl_map) == (replace(spec, max_ppl_increase=1.0), True)
    assert effective_budget(spec, omega, None) == (replace(spec, budget_from="uniform-best"), True)
    proxy = OmegaTable((16, 4), [[0.0, 1.0]] * 4, "proxy")
    assert effective_budget(spec, proxy, ppl_map)[0].budget_from == "uniform-best"  # a ppl_map of another ω
    explicit = replace(spec, max_omega=2.0)
    assert effective_budget(explicit, omega, ppl_map) == (explicit, False)


@pytest.mark.parametrize("base", BASELINES)
def test_llmpq_vs_baseline_configs(base):
    spec = compose_experiment([f"solver=llmpq-vs-{base}"]).solver
    assert spec.method == "llmpq" and spec.budget_from == base and spec.name == f"llmpq-vs-{base}"


def test_default_budget_is_validated(tmp_path):
    d = tmp_path / "solver"
    d.mkdir()
    (d / "mine.yaml").write_text("name: mine\nmethod: llmpq\ndefault_budget: {budget_form: uniform-best}\n")
    with pytest.raises(ConfigError, match="budget_form.*did you mean `budget_from`"):
        compose_experiment(["solver=mine"], config_dir=str(tmp_path))
    (d / "mine.yaml").write_text("name: mine\nmethod: llmpq\ndefault_budget: {budget_from: llmpq}\n")
    with pytest.raises(ConfigError, match="default_budget.budget_from"):
        compose_experiment(["solver=mine"], config_dir=str(tmp_path))


def test_default_budget_falls_back_when_uniform_best_cannot_fit(tmp_path):
    """paper-c4 fits llmpq and adabits but a default budget source that cannot fit must not sink llmpq: with
    uniform as the default source (it cannot fit paper-c4), llmpq takes the next baseline's Σω."""
    exp = compose_experiment(C4)
    ctx = build_context(exp, tmp_path)
    omega = proxy_omega(ctx.shape, tuple(sorted(exp.model.bits, reverse=True)))
    spec = replace(exp.solver, default_budget=DefaultBudget(budget_from="uniform"))
    out = solve(replace(exp, solver=spec), tmp_path, ctx=ctx, omega=omega)
    assert out.meta["budget_source"] == "budget_from:uniform-best (default)"
    assert out.plan.budget is not None and out.plan.omega <= out.plan.budget * (1 + 1e-9)
