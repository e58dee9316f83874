"""`llmpq export plan=PLAN engine=vllm|sglang [out=DIR]`: a plan as an engine's model directory.

The plan is checked first: against the experiment (same model, cluster and workload: pass `model=`,
`cluster=`, `workload=` as for deploy), against the engine's rules (`engine`), then against its stores
(every layer file sha256-checked, holding the layer, scheme, bits and group size the plan names) and the
rules only stored weights answer. A plan outside the rules is refused with every offending layer and
rule, exit 2, and nothing is written. Then the
directory is built beside `out` and renamed into place whole:

- the weights, `config.json`, `quantize_config.json`, tokenizer and generation files (`checkpoint`);
- `launch.sh` (vllm) or `launch_sglang.sh` (sglang), and `README.md` (`launch`);
- `llmpq_plan.json`, a copy of the plan.

Default `out`: `results/export/{model}/{cluster}/{workload}/{solver}-{engine}/`.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .. import paths
from ..artifacts import staged_dir
from ..config import Experiment
from ..generate.planning import planning_experiment
from ..models.families import family
from ..models.source import model_dir as source_dir
from ..models.source import model_shape
from ..solve.plan import Plan, PlanError, read_plan
from .checkpoint import DEFAULT_SHARD_BYTES, WrittenWeights, planned_layers, quantize_config, write_configs, \
    write_weights
from .engine import Violation, check_engine, plan_violations
from .launch import SCRIPTS, EngineSettings, engine_settings, readme, script_text

PLAN_COPY = "llmpq_plan.json"


class ExportInputError(ValueError):
    """The plan does not go with the experiment or the engine; the message names the file and key."""


class ExportRefused(ExportInputError):
    """The plan breaks the engine's rules; the message lists every offending layer and rule."""

    def __init__(self, where: str, engine: str, violations: Sequence[Violation]):
        self.violations = tuple(violations)
        lines = "\n".join(f"  {v}" for v in self.violations)
        super().__init__(f"{where}: {len(self.violations)} violation(s) of {engine}'s rules "
                         f"(plan with solver.engine={engine} to stay inside them):\n{lines}")


@dataclass(frozen=True)
class ExportResult:
    """A written export: where, its weight files, its quantize config (None: all 16-bit), the engine knobs."""

    out: Path
    weights: WrittenWeights
    quant_config: dict[str, Any] | None
    settings: EngineSettings


def _check_experiment(exp: Experiment, plan: Plan, where: str) -> None:
    mine = (exp.model.name, exp.cluster.name, exp.workload.name)
    theirs = (plan.model, plan.cluster, plan.workload)
    if mine != theirs:
        raise ExportInputError(f"{where}: plan is for model/cluster/workload {'/'.join(theirs)}, the experiment is "
                               f"{'/'.join(mine)} (pass model=, cluster= and workload= to match)")
    unknown = sorted({s.device for s in plan.stages} - set(exp.devices))
    if unknown:
        raise ExportInputError(f"{where}: stages[].device {unknown} are not devices of cluster {exp.cluster.name}")


def export_plan(exp: Experiment, plan_path: Path, engine: str, out: Path, results: Path,
                shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportResult:
    """Check the plan and write its directory (module docstring); ExportRefused lists the broken rules."""
    where = str(plan_path)
    try:
        check_engine(engine)
    except ValueError as exc:
        raise ExportInputError(f"engine: {exc}") from None
    plan = read_plan(plan_path)
    exp = planning_experiment(exp)[0]   # a prompts-file workload: its shape from the file, as deploy sees it
    _check_experiment(exp, plan, where)
    model_dir = source_dir(exp.model, results=results)
    if model_dir is None:
        raise FileNotFoundError(f"model/{exp.model.name}.yaml: source {exp.model.source!r} is not a directory with "
                                "weights (export needs the model's checkpoint)")
    shape = model_shape(exp.model)
    if plan.num_layers != shape.num_layers:
        raise ExportInputError(f"{where}: stages cover {plan.num_layers} layers, model {plan.model} has {shape.num_layers}")
    rules = (engine, plan, exp.devices, shape.layer.linears, plan.quant_group_size)
    if violations := plan_violations(*rules):
        raise ExportRefused(where, engine, violations)
    layers = planned_layers(plan.bits, paths.quant_root(results, plan.model), plan.quant_scheme,
                            plan.quant_group_size, shape.family)
    if violations := plan_violations(*rules, {layer.index: layer.header.linears for layer in layers}):
        raise ExportRefused(where, engine, violations)
    quant = quantize_config(layers, shape.layer.linears, family(shape.family).layers)
    settings = engine_settings(plan, exp.workload, exp.devices)
    with staged_dir(out) as staging:
        weights = write_weights(staging, model_dir, layers, shape.family, shard_bytes)
        write_configs(staging, model_dir, quant)
        shutil.copyfile(plan_path, staging / PLAN_COPY)
        (staging / SCRIPTS[engine]).write_text(script_text(engine, plan, exp.workload, exp.devices, settings))
        dynamic = None if quant is None else quant["dynamic"]
        (staging / "README.md").write_text(readme(engine, plan, exp.workload, exp.devices, settings,
                                                  weights.files, dynamic))
    return ExportResult(Path(out), weights, quant, settings)


def summary(result: ExportResult, engine: str) -> str:
    """Two lines for the terminal: where, what."""
    quant = "all 16-bit (no quantize_config)" if result.quant_config is None else \
        f"quantize_config with {len(result.quant_config['dynamic'])} dynamic rules"
    return (f"wrote {result.out}: {len(result.weights.files)} weight file(s), {result.weights.total_bytes} bytes, "
            f"{quant}\nstart it with: bash {result.out / SCRIPTS[engine]}  (pipeline split "
            f"{','.join(map(str, result.settings.partition))})")


def cli_export(exp: Experiment, args: Any) -> int:
    """`llmpq export plan=PLAN engine=vllm|sglang [out=DIR]` (module docstring)."""
    if args.engine is None:
        print("llmpq export: engine=: missing (vllm or sglang)", file=sys.stderr)
        return 2
    results = Path(args.results)
    key = (results, exp.model.name, exp.cluster.name, exp.workload.name, exp.solver.name)
    plan_path = args.plan or paths.plan_path(*key)
    out = args.out or paths.export_dir(*key, args.engine)
    try:
        result = export_plan(exp, Path(plan_path), args.engine, Path(out), results)
    except (ExportInputError, PlanError) as exc:
        print(f"llmpq export: {exc}", file=sys.stderr)
        return 2
    print(summary(result, args.engine))
    return 0
