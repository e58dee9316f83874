"""`llmpq summary`: one self-contained HTML page with the result of every evaluated experiment.

Per model × cluster × workload (each `results/eval/{model}/{cluster}/{workload}.parquet`): the comparison table
(measured and predicted tok/s, errors, perplexity, Σω, the ratio to the baselines), the plan figure, and a
paragraph that says why the fastest plan is fastest, from the plans themselves: the bits, the partition and the
micro-batches it chose against the best baseline's. Identical plans are said to be identical, not ranked; a
difference within the spreads of the repeated runs is called noise; runs on a loaded machine are not ranked.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import paths
from ..artifacts import read_table, write_text
from ..profile.load import is_loaded
from ..solve.methods import is_baseline

COLUMNS: tuple[tuple[str, str, str], ...] = (  # (eval column, header, format)
    ("method", "method", "{}"),
    ("measured_tok_s", "measured tok/s", "{:,.1f}"),
    ("predicted_tok_s", "predicted tok/s", "{:,.1f}"),
    ("prefill_rel_error", "prefill error", "{:+.1%}"),
    ("decode_rel_error", "decode error", "{:+.1%}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("omega", "Σω", "{:.3g}"),
    ("measured_tok_s_min", "slowest run tok/s", "{:,.1f}"),
    ("measured_tok_s_max", "fastest run tok/s", "{:,.1f}"),
    ("ratio_vs_best_baseline", "vs best baseline", "{:.2f}×"),   # shown as the row's `comparison` text where it has one
    ("compared_with", "compared with (equal or worse quality)", "{}"),
    ("plan_status", "plan status", "{}"),
    ("generate_tok_s", "batch job tok/s", "{:,.1f}"),
    ("generate_predicted_tok_s", "batch job predicted", "{:,.1f}"),
)


def bits_text(plan: Mapping[str, Any]) -> str:
    """'all 16-bit' or '3× 16-bit + 1× 8-bit' (layers per bit-width, widest first)."""
    counts = Counter(b for stage in plan["stages"] for b in stage["bits"])
    if len(counts) == 1:
        return f"all {next(iter(counts))}-bit"
    return " + ".join(f"{n}× {b}-bit" for b, n in sorted(counts.items(), reverse=True))


def partition_text(plan: Mapping[str, Any]) -> str:
    """'3 + 1 layers on cpu-large, cpu-small'."""
    sizes = " + ".join(str(s["layers"][1] - s["layers"][0]) for s in plan["stages"])
    return f"{sizes} layers on {', '.join(s['device'] for s in plan['stages'])}"


def micro_batch_text(plan: Mapping[str, Any]) -> str:
    return f"b_p = {plan['micro_batch']['prefill']}, b_d = {plan['micro_batch']['decode']}"


def same_plan(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same stages (device, layers, bits) and micro-batches: the same job whatever the method's name."""
    def key(p):
        return (tuple((s["device"], tuple(s["layers"]), tuple(s["bits"])) for s in p["stages"]),
                p["micro_batch"]["prefill"], p["micro_batch"]["decode"])
    return key(a) == key(b)


def why_paragraph(plans: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> str:
    """Why the fastest measured method wins, in terms of its plan, against the baseline it was fairly compared with
    (`compared_with`: the best of equal or worse quality; for a winning baseline, the next best baseline)."""
    measured = [r for r in rows if r.get("measured_tok_s") == r.get("measured_tok_s")]
    ranked = sorted(measured, key=lambda r: -r["measured_tok_s"])
    if not ranked:
        return "No method ran."
    winner = ranked[0]
    name, plan = winner["method"], plans[winner["method"]]
    text = (f"{name} is the fastest here: {winner['measured_tok_s']:,.1f} tok/s measured "
            f"({winner['predicted_tok_s']:,.1f} predicted) with {bits_text(plan)}, {partition_text(plan)}, "
            f"{micro_batch_text(plan)}.")
    if is_baseline(name) or "compared_with" not in winner:
        baselines = [r for r in ranked if is_baseline(r["method"]) and r["method"] != name]
    else:
        baselines = [r for r in ranked if r["method"] == winner.get("compared_with")]
        if not baselines:
            return text + " No baseline has equal or worse quality to compare it with."
    if not baselines:
        return text
    other = baselines[0]
    base = plans[other["method"]]
    if same_plan(plan, base):
        return (text + f" Its plan is identical to {other['method']}'s: the difference in measured throughput "
                       "is run-to-run noise, not a better plan.")
    loaded = [r["load_factor"] for r in rows if is_loaded(r.get("load_factor", math.nan))]
    if loaded:
        return (text + f" These runs were timed on a loaded machine (idle reference up to {max(loaded):.2f}× the "
                       "profile's), so no ranking is given: rerun on a quiet machine.")
    ratio = winner["measured_tok_s"] / other["measured_tok_s"] if other["measured_tok_s"] else math.nan
    diffs = []
    if bits_text(plan) != bits_text(base) or [s["bits"] for s in plan["stages"]] != [s["bits"] for s in base["stages"]]:
        diffs.append(f"bits ({bits_text(plan)} against {bits_text(base)})")
    if partition_text(plan) != partition_text(base):
        diffs.append(f"partition ({partition_text(plan)} against {partition_text(base)})")
    if micro_batch_text(plan) != micro_batch_text(base):
        diffs.append(f"micro-batches ({micro_batch_text(plan)} against {micro_batch_text(base)})")
    quality = ""
    if winner.get("perplexity") == winner.get("perplexity") and other.get("perplexity") == other.get("perplexity"):
        quality = f" Perplexity {winner['perplexity']:.2f} against {other['perplexity']:.2f}."
    noise = ""
    if _overlap(winner, other):
        noise = " Their repeated runs' spreads overlap: the difference is within noise."
    return (text + f" That is {ratio:.2f}× the best baseline, {other['method']} "
            f"({other['measured_tok_s']:,.1f} tok/s), from which it differs in " + "; ".join(diffs) + "." + noise
            + quality)


def _overlap(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two rows' measured spreads (slowest to fastest run) overlap; False where a row has none."""
    lo_a, hi_a, lo_b, hi_b = (x.get(k, math.nan) for x in (a, b) for k in ("measured_tok_s_min", "measured_tok_s_max"))
    if any(v != v for v in (lo_a, hi_a, lo_b, hi_b)):
        return False
    return lo_a <= hi_b and lo_b <= hi_a


def _cell(value: Any, fmt: str) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    try:
        return html.escape(fmt.format(value))
    except (ValueError, TypeError):
        return html.escape(str(value))


def table_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison table (columns present in the eval rows, in `COLUMNS` order)."""
    def shown(value: Any) -> bool:
        return value is not None and value != "" and not (isinstance(value, float) and math.isnan(value))

    def value(r: Mapping[str, Any], key: str) -> Any:
        return r["comparison"] if key == "ratio_vs_best_baseline" and r.get("comparison") else r.get(key)

    cols = [c for c in COLUMNS if c[0] == "method" or any(shown(value(r, c[0])) for r in rows)]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(value(r, k), f)}</td>" for k, _, f in cols) + "</tr>" for r in rows)
    return f'<table class="result"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def experiment_section(results: Path, eval_file: Path) -> str:
    """One experiment's heading, table, paragraph and plan figure."""
    model, cluster, workload = eval_file.parent.parent.name, eval_file.parent.name, eval_file.stem
    rows = read_table("eval", eval_file).to_pylist()
    plan_dir = paths.plan_path(results, model, cluster, workload, "x").parent
    plans = {r["method"]: json.loads((plan_dir / f"{r['method']}.json").read_text()) for r in rows}
    figures = eval_file.with_suffix("")
    return (f"<section><h2>{html.escape(model)} on {html.escape(cluster)}, workload {html.escape(workload)}</h2>"
            f"{table_html(rows)}<p>{html.escape(why_paragraph(plans, rows))}</p>"
            f"{_image(figures / 'plan.png', 'plan of each method: layers coloured by bits, memory per stage')}"
            "</section>")


STYLE = """
.llmpq-summary { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table.result { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
table.result th, table.result td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.result td:first-child, table.result th:first-child { text-align: left; }
.llmpq-summary img { max-width: 100%; }
"""


def summary_body(results: Path, eval_files: Sequence[Path]) -> str:
    """The page's content without the document around it (the Snakemake report embeds it on its first page)."""
    sections = "".join(experiment_section(results, f) for f in eval_files)
    note = ("<p>measured: tokens generated per second by <code>llmpq deploy</code>, one process per stage; "
            "predicted: the plan's cost-model figure. Timings vary from run to run; perplexity is of the exact "
            "deployed weights on held-out text.</p>")
    return f'<div class="llmpq-summary"><style>{STYLE}</style>{note}{sections}</div>\n'


def summary_html(body: str) -> str:
    """The whole page around `summary_body`."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>llmpq results</title></head>"
            f"<body><h1>llmpq results</h1>{body}</body></html>\n")


def body_path(page: Path) -> Path:
    """The page's embeddable content beside it: `summary.html` -> `summary.body.html`."""
    return Path(page).with_suffix(".body.html")


def eval_files_under(results: Path) -> list[Path]:
    return sorted((Path(results) / "eval").glob("*/*/*.parquet"))


def cli_summary(exp, args) -> int:
    """`llmpq summary [out=PATH]`: the page for every evaluated experiment under the results directory."""
    files = eval_files_under(args.results)
    if not files:
        raise FileNotFoundError(f"{Path(args.results) / 'eval'}: nothing evaluated yet (run `llmpq evaluate`)")
    out = Path(args.out or paths.summary_path(args.results))
    body = summary_body(Path(args.results), files)
    write_text(body, body_path(out))
    write_text(summary_html(body), out)
    print(f"summary of {len(files)} experiment(s) written to {out}")
    return 0
