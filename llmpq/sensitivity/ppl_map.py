"""Σω → predicted relative perplexity increase (%), fitted on measured mixed-bit assignments of a model.

`llmpq ppl-map` measures the perplexity (eval split) of random mixed-bit assignments built from the real
quantized layers, and of every uniform bit-width, relative to the all-16-bit store, and fits a monotone
map from the assignment's Σω to that increase: isotonic regression anchored at (0, 0), linear between
knots and, beyond the last knot, along the line from the origin through it. The solver calls
`load_ppl_map(path).omega_budget(max_ppl_increase_pct)` (and `predict`).

Indicator: `output_error` by default. On tiny-opt, 30 equal-byte plans ranked by the whole eval split
(`benchmarks/indicator_validation.py`): Spearman ρ = 0.91 for `output_error` and `kl`, 0.81 for
`loss_delta`, 0.71 for `variance` (the paper's), 0 for `bits_only`. `output_error` ties with `kl` and
costs one layer replay per (layer, bits) instead of a full-model forward, so it scales to large models.
The JSON records which indicator its Σω uses.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..artifacts import write_text
from ..progress import bar

SCHEMA_VERSION = 1
DEFAULT_INDICATOR = "output_error"
DEFAULT_POINTS = 24


@dataclass(frozen=True)
class PplMap:
    """A monotone piecewise-linear map Σω → perplexity increase (%) through (0, 0)."""

    model: str
    indicator: str
    points: tuple[tuple[float, float], ...]      # measured (Σω, increase %)
    knots: tuple[tuple[float, float], ...]       # fitted, strictly increasing in Σω, nondecreasing in %

    @property
    def tail_slope(self) -> float:
        """% per unit Σω beyond the last knot (origin-to-last-knot slope)."""
        omega, pct = self.knots[-1]
        return pct / omega if omega > 0 else 0.0

    def predict(self, omega_sum: float) -> float:
        """Predicted relative perplexity increase in % of an assignment with this Σω."""
        if omega_sum <= 0:
            return 0.0
        for (w0, p0), (w1, p1) in zip(self.knots, self.knots[1:]):
            if omega_sum <= w1:
                return p0 + (p1 - p0) * (omega_sum - w0) / (w1 - w0)
        w, p = self.knots[-1]
        return p + self.tail_slope * (omega_sum - w)

    def omega_budget(self, max_ppl_increase_pct: float) -> float:
        """The largest Σω whose predicted increase is at most `max_ppl_increase_pct` (inf if unbounded)."""
        if max_ppl_increase_pct < 0:
            raise ValueError(f"max_ppl_increase_pct must be >= 0, got {max_ppl_increase_pct}")
        for (w0, p0), (w1, p1) in zip(self.knots, self.knots[1:]):
            if p1 > max_ppl_increase_pct:
                return w0 + (max_ppl_increase_pct - p0) * (w1 - w0) / (p1 - p0)
        w, p = self.knots[-1]
        slope = self.tail_slope
        return math.inf if slope <= 0 else w + (max_ppl_increase_pct - p) / slope

    def to_json(self, plans: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "model": self.model, "indicator": self.indicator,
            "points": [list(p) for p in self.points],
            "fit": {"kind": "isotonic", "knots": [list(k) for k in self.knots], "tail": "origin_line",
                    "tail_slope": self.tail_slope},
            "plans": list(plans),
        }


def configured_indicator(exp: Any) -> str:
    """The planner's indicator: the model config's `indicator`, else `sensitivity.indicator` (default
    output_error)."""
    return str(exp.model.indicator or (exp.raw.get("sensitivity") or {}).get("indicator") or DEFAULT_INDICATOR)


def _isotonic(ys: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Pool-adjacent-violators: the nondecreasing sequence closest to `ys` in weighted least squares."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for y, w in zip(ys, weights):
        blocks.append([y, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [b[0] for b in blocks for _ in range(int(b[2]))]


def fit_ppl_map(points: Sequence[tuple[float, float]], model: str, indicator: str) -> PplMap:
    """Isotonic fit of increase % on Σω, anchored at (0, 0) and clipped at 0 % (see module docstring)."""
    clean = sorted((float(w), max(0.0, float(p))) for w, p in points if w > 0)
    if not clean:
        raise ValueError("ppl_map: need at least one point with Σω > 0")
    merged: dict[float, list[float]] = {}
    for w, p in clean:
        merged.setdefault(w, []).append(p)
    omegas = [0.0] + sorted(merged)
    means = [0.0] + [sum(merged[w]) / len(merged[w]) for w in omegas[1:]]
    weights = [1e9] + [float(len(merged[w])) for w in omegas[1:]]
    fitted = _isotonic(means, weights)
    knots = tuple(zip(omegas, fitted))
    return PplMap(model, indicator, tuple((float(w), float(p)) for w, p in points), knots)


def load_ppl_map(path: str | Path) -> PplMap:
    """Read a ppl_map JSON; ValueError naming the file if it is malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if data["schema_version"] != SCHEMA_VERSION:
            raise ValueError(f"schema_version {data['schema_version']} (expected {SCHEMA_VERSION})")
        knots = tuple((float(w), float(p)) for w, p in data["fit"]["knots"])
        points = tuple((float(w), float(p)) for w, p in data["points"])
        return PplMap(str(data["model"]), str(data["indicator"]), points, knots)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: ppl_map not found (run `llmpq ppl-map`)") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed ppl_map: {exc}") from None


def random_assignments(num_layers: int, bits: Sequence[int], count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`count` distinct mixed assignments: a random number of random layers at random bits below 16."""
    rng = random.Random(seed)
    low = sorted(b for b in bits if b < 16)
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    for _ in range(count * 50):
        if len(out) == count:
            break
        k = rng.randint(1, num_layers)
        chosen = set(rng.sample(range(num_layers), k))
        plan = tuple(rng.choice(low) if i in chosen else 16 for i in range(num_layers))
        if plan not in seen:
            seen.add(plan)
            out.append(plan)
    return out


def measure_plans(evaluator: Any, plans: Sequence[Sequence[int]], progress: bool = True) -> list[float]:
    """Perplexity of each per-layer bit assignment with the real quantized layers (a `StoreEvaluator`)."""
    return [evaluator.plan(plan).perplexity for plan in bar(plans, desc="ppl_map perplexity of mixed assignments",
                                                             unit="assignments", disable=not progress)]


def cli_ppl_map(exp: Any, args: Any) -> int:
    """`llmpq ppl-map model=M [indicator=NAME] [out=PATH]`: measure assignments and fit the map."""
    from ..evaluate.perplexity import EvalSpec, StoreEvaluator
    from ..models.source import model_dir
    from ..paths import ppl_map_path, quant_root, sensitivity_path
    from ..quantize.calibration import quality_device
    from .table import omega_sum, read_omega

    weights = model_dir(exp.model, results=args.results)
    if weights is None:
        raise FileNotFoundError(f"model {exp.model.name}: source {exp.model.source!r} is not a local directory with weights")
    indicator = args.indicator or configured_indicator(exp)
    omega = read_omega(sensitivity_path(args.results, exp.model.name), indicator)
    spec = EvalSpec.from_raw(exp.raw["eval"])
    evaluator = StoreEvaluator(weights, spec, quant_root(args.results, exp.model.name), exp.model.quant.scheme,
                               device=quality_device(exp))
    n = evaluator.num_layers
    plans = [tuple([b] * n) for b in sorted(exp.model.bits, reverse=True)]
    plans += random_assignments(n, exp.model.bits, DEFAULT_POINTS)
    ppl = measure_plans(evaluator, plans)
    base = ppl[0] if plans[0] == tuple([16] * n) else measure_plans(evaluator, [tuple([16] * n)], False)[0]
    records = [{"bits": list(p), "perplexity": v, "omega_sum": omega_sum(omega, p),
                "ppl_increase_pct": 100.0 * (v / base - 1.0)} for p, v in zip(plans, ppl)]
    fitted = fit_ppl_map([(r["omega_sum"], r["ppl_increase_pct"]) for r in records], exp.model.name, indicator)
    out = args.out or ppl_map_path(args.results, exp.model.name)
    write_text(json.dumps(fitted.to_json(records), indent=2, sort_keys=True) + "\n", out)
    print(f"{out}: {len(records)} assignments, indicator {indicator}, fp perplexity {base:.3f}; "
          f"1% increase ↔ Σω {fitted.omega_budget(1.0):.4g}")
    return 0
