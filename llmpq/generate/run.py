"""`llmpq generate plan=PLAN [prompts=FILE] [out=FILE]`: a prompts file in, one completion per prompt out.

Before any work: the prompts file is read, tokenised and validated (`llmpq.data.prompts`; exit 2 listing
every problem, nothing written), the plan is checked against the experiment and against the file (the
plan's KV cache must hold its longest prompt + max_new_tokens), every stage's planned memory against its
device's cap, and an existing output against this run's inputs (`llmpq.generate.outputs`; other inputs
are refused naming both hashes). Then the plan's stages run as processes (`llmpq.runtime.genstage`,
launched as deploy launches them: in this process for one stage, torchrun or srun otherwise) over the
prompts still to do; completions reach `<out>.partial` a wave at a time, and when every prompt has one
they are written to `<out>` in input order. A summary line and a row of the `generate_runs` table
(`<out stem>.runs.parquet`, one row per finished run) give prompts, generated tokens, wall time,
tokens/s, prompts/s and the plan's predicted tokens/s.

Options come from the config's optional `generate:` block (`GenerateOptions`). SIGTERM (a SLURM
pre-emption or time limit) stops the stage processes; running the same command again resumes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .. import paths
from ..artifacts import file_sha256, provenance, read_table, write_table
from ..config import Experiment
from ..data.prompts import PromptsError, TokenizedPrompt
from ..models.shape import shape_from_config
from ..models.source import hf_config_dict, model_dir
from ..progress import bar as console_bar
from ..runtime.batcher import MODES
from ..runtime.caps import StageRefusal, check_caps
from ..runtime.genstage import GenerateJob, GenerateReport, run_generate_stage
from ..runtime.job import StageSpec
from ..runtime.launch import (LAUNCHERS, DeployError, DeployOptions, _run, check_plan, cuda_assignment,
                              launch_command, launch_mode, run_dtype, stage_specs)
from ..runtime.stage import Placement
from ..solve.plan import Plan, read_plan
from ..solve.skip import infeasible_record, write_skipped
from .outputs import OutputIdentity, finalize_output, id_key, partial_path, prepare_output, runs_path
from .planning import PromptsInput, load_tokenizer, planning_workload, read_prompts

GENERATE_MODULE = "llmpq.runtime.genstage"
GENERATE_LAUNCHERS = tuple(name for name in LAUNCHERS if name != "sbatch")  # no SLURM job of its own yet
SIGTERM_EXIT_CODE = 143


@dataclass(frozen=True)
class GenerateOptions:
    """The optional `generate:` config block.

    mode: continuous (finished sequences leave their micro-batch, free slots are refilled) | static (waves).
    timeout_s: how long a stage waits for a peer before it fails. launcher: auto | torchrun | srun.
    token_ids: also write each completion's token ids. progress: show progress on the first stage.
    verify: check layer files against their manifests. on_change: refuse | restart, for an output made from
    other inputs (the workflow restarts: Snakemake has found the output stale).
    wave_pause_s: a test hook, sleep after each written wave.
    """

    mode: str = "continuous"
    timeout_s: float = 60.0
    launcher: str = "auto"
    token_ids: bool = False
    progress: bool = True
    verify: bool = True
    on_change: str = "refuse"
    wave_pause_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"generate.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.launcher not in GENERATE_LAUNCHERS:
            raise ValueError(f"generate.launcher: {self.launcher!r} is not one of {', '.join(GENERATE_LAUNCHERS)}")
        if self.on_change not in ("refuse", "restart"):
            raise ValueError(f"generate.on_change: {self.on_change!r} is not one of refuse, restart")
        if self.timeout_s <= 0 or self.wave_pause_s < 0:
            raise ValueError("generate.timeout_s must be > 0 and generate.wave_pause_s >= 0")

    @staticmethod
    def from_raw(raw: Mapping[str, Any] | None) -> "GenerateOptions":
        raw = dict(raw or {})
        known = {f.name for f in fields(GenerateOptions)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"generate: unknown keys {unknown} (known: {sorted(known)})")
        casts = {"mode": str, "timeout_s": float, "launcher": str, "token_ids": bool, "progress": bool,
                 "verify": bool, "on_change": str, "wave_pause_s": float}
        return GenerateOptions(**{k: casts[k](v) for k, v in raw.items()})


@dataclass(frozen=True)
class GenerateResult:
    """A finished job: its output, how many prompts it holds and this run's counts (None: nothing to do)."""

    out: Path
    total: int
    done_before: int
    report: GenerateReport | None
    row: dict[str, Any] | None


def eos_ids(weights: Path) -> tuple[int, ...]:
    """The model's end-of-sequence ids: `eos_token_id` of generation_config.json, else of config.json."""
    for name in ("generation_config.json", "config.json"):
        path = weights / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return tuple(sorted({int(v) for v in (value if isinstance(value, list) else [value])}))
    return ()


def check_fits_plan(exp_plan_kv: int | None, found: PromptsInput, gen_len: int, where: str) -> None:
    """The plan's KV cache, planned for `exp_plan_kv` positions a sequence, must hold the file's longest
    prompt + max_new_tokens (None: the plan does not say; the memory cap check still applies)."""
    need = found.stats.max_tokens + gen_len
    if exp_plan_kv is not None and need > exp_plan_kv:
        raise PromptsError(str(found.path), "prompts", f"the longest prompt ({found.stats.max_tokens} tokens) + "
                           f"max_new_tokens ({gen_len}) needs {need} cache positions; plan {where} holds "
                           f"{exp_plan_kv} (solve for this file, or raise overlong: truncate_left)")


def planned_positions(plan: Plan, exp: Experiment) -> int | None:
    """Cache positions a sequence has in the plan: from its prompts record, else a sampled workload's s + n
    (None for a prompts-file workload whose plan records no file)."""
    if plan.prompts is not None:
        return plan.prompts.stats.max_tokens + plan.prompts.max_new_tokens
    return exp.workload.kv_len if exp.workload.prompts_file is None else None


def run_rows(job: GenerateJob, plan: Plan, reports: list[GenerateReport], identity: OutputIdentity) -> dict[str, Any]:
    """One `generate_runs` row for a finished run (counts from the first stage, compute and wait summed over
    every stage)."""
    report = reports[0]
    wall = report.wall_s
    tok_s = report.tokens / wall if wall > 0 else 0.0
    predicted = plan.throughput_tok_s
    return {
        "method": job.method, "mode": job.mode, "stages": len(job.stages), "batch": job.batch,
        "micro_batch_prefill": job.micro_batch_prefill, "micro_batch_decode": job.micro_batch_decode,
        "max_new_tokens": job.max_new_tokens, "prompts_total": job.total, "prompts_resumed": job.done_before,
        "prompts": report.prompts, "prompt_tokens": sum(len(p) for p in job.prompts),
        "generated_tokens": report.tokens, "eos_stops": report.eos, "wall_s": wall, "tokens_per_s": tok_s,
        "prompts_per_s": report.prompts / wall if wall > 0 else 0.0, "predicted_tokens_per_s": predicted,
        "rel_error": (tok_s - predicted) / predicted if predicted else math.nan,
        "steps": report.steps,
        "compute_s": sum(p["compute_ms"] for r in reports for p in r.phases.values()) / 1e3,
        "wait_s": sum(p["wait_ms"] for r in reports for p in r.phases.values()) / 1e3,
        "plan_sha256": identity.plan_sha256, "prompts_sha256": identity.prompts_sha256,
    }


def _append_row(path: Path, row: dict[str, Any], meta: dict[str, str]) -> None:
    rows = read_table("generate_runs", path).to_pylist() if path.is_file() else []
    write_table("generate_runs", rows + [row], path, meta)


class PartialWatch:
    """Console progress of a batch job whose stages run as other processes: the completions (one line each) its
    first stage has written to the partial file so far (`llmpq.progress`)."""

    def __init__(self, job: GenerateJob):
        self.path, self.offset = Path(job.partial), 0   # lines before `offset` are counted in the bar already
        if self.path.is_file():
            self.offset = self.path.stat().st_size       # the resumed lines: `done_before`
        self.bar = console_bar(total=job.total, initial=job.done_before, desc="generate", unit="prompts", disable=True)

    def __call__(self) -> None:
        if self.path.is_file():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                new = f.read()
            complete = new.rfind(b"\n") + 1      # a wave's last line may still be being written
            if complete:
                self.offset += complete
                self.bar.update(new.count(b"\n", 0, complete))

    def close(self) -> None:
        self()
        self.bar.close()


def _launch(job: GenerateJob, mode: str) -> list[GenerateReport]:
    if mode == "inprocess":
        return [run_generate_stage(job, Placement(0, 1, 0), init_dist=False)]
    world = len(job.stages)
    cmd, env = launch_command(mode, world, job.write(Path(job.workdir) / "job.json"), os.environ, GENERATE_MODULE)
    watch = PartialWatch(job)
    try:
        code = _run(cmd, env, watch)
    finally:
        watch.close()
    if code != 0:
        raise DeployError(f"{mode} exited with code {code}: a stage failed (see the stage errors above)")
    missing = [r for r in range(world) if not job.report_path(r).is_file()]
    if missing:
        raise DeployError(f"stages {missing} finished without a report")
    return [GenerateReport.read(job.report_path(r)) for r in range(world)]


def build_job(exp: Experiment, plan: Plan, specs: list[StageSpec], weights: Path, results: Path, workdir: Path,
              found: PromptsInput, todo: list[TokenizedPrompt], eos: tuple[int, ...], out: Path, done_before: int,
              options: GenerateOptions) -> GenerateJob:
    """The job of a checked plan and prompts file: its stages, the prompts still to do, the settings."""
    w = exp.workload
    return GenerateJob(
        method=plan.method, model_dir=str(weights.resolve()),
        quant_root=str(paths.quant_root(results, exp.model.name).resolve()), scheme=plan.quant_scheme,
        stages=tuple(specs), workdir=str(workdir.resolve()), micro_batch_prefill=plan.micro_batch_prefill,
        micro_batch_decode=plan.micro_batch_decode, batch=w.batch, max_new_tokens=w.gen_len,
        max_len=found.stats.max_tokens + w.gen_len, eos=eos,
        pad_id=int(hf_config_dict(exp.model).get("pad_token_id") or 0), mode=options.mode,
        prompts=tuple(p.ids for p in todo), ids=tuple(p.id for p in todo), truncated=tuple(p.truncated for p in todo),
        partial=str(partial_path(out).resolve()), total=len(found.prompts), done_before=done_before,
        token_ids=options.token_ids, progress=options.progress, wave_pause_s=options.wave_pause_s,
        backend="gloo" if specs[0].kind == "cpu" else "nccl", timeout_s=options.timeout_s, verify=options.verify,
        dtype=run_dtype(plan, specs))


def generate(exp: Experiment, plan_path: str | Path, out: str | Path, prompts: str | Path | None = None,
             options: GenerateOptions | None = None, results: str | Path = "results") -> GenerateResult:
    """Run the plan at `plan_path` over a prompts file (default: the workload's) into `out` (module docstring)."""
    options = options or GenerateOptions()
    plan_path, out = Path(plan_path), Path(out)
    if prompts is None and exp.workload.prompts_file is None:
        raise PromptsError(f"workload/{exp.workload.name}.yaml", "prompts",
                           f"{exp.workload.prompts!r} is a text source, not a prompts file: pass prompts=PATH "
                           "(.jsonl or .parquet) or use a workload with prompts: PATH")
    plan = read_plan(plan_path)
    weights = model_dir(exp.model)
    if weights is None:
        raise FileNotFoundError(f"model {exp.model.name}: source {exp.model.source!r} is not a local directory "
                                "with weights")
    positions = planned_positions(plan, exp)
    tokenizer = load_tokenizer(exp)
    found = read_prompts(exp, prompts, tokenizer)
    exp = replace(exp, workload=planning_workload(exp.workload, found.stats))
    shape = shape_from_config(hf_config_dict(exp.model))
    check_plan(exp, plan, shape.num_layers, shape.max_positions, str(plan_path))
    check_fits_plan(positions, found, exp.workload.gen_len, str(plan_path))
    specs = stage_specs(exp, plan, shape)
    check_caps(specs)
    w = exp.workload
    eos = eos_ids(weights) if w.stop == "eos" else ()
    if w.stop == "eos" and not eos:
        raise PromptsError(f"workload/{w.name}.yaml", "stop", f"eos, but model {exp.model.name} names no "
                                                              "eos_token_id (use stop: none)")
    identity = OutputIdentity(file_sha256(plan_path), found.stats.sha256, w.gen_len, w.stop, eos, w.overlong)
    ids = [p.id for p in found.prompts]
    out.parent.mkdir(parents=True, exist_ok=True)
    state = prepare_output(out, identity, ids, options.on_change)
    if state.final:
        return GenerateResult(out, len(ids), len(ids), None, None)
    todo = [p for p in found.prompts if id_key(p.id) not in state.done]
    report, row = None, None
    if todo:
        mode = launch_mode(len(specs), DeployOptions(launcher=options.launcher), os.environ)
        if mode == "torchrun":
            specs = [StageSpec(**{**vars(s), "cuda_index": i}) for s, i in zip(specs, cuda_assignment(specs))]
        workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.generate-", dir=out.parent))
        try:
            job = build_job(exp, plan, specs, weights, Path(results), workdir, found, todo, eos, out, len(state.done),
                            options)
            reports = _launch(job, mode)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        report = reports[0]
        row = run_rows(job, plan, reports, identity)
        meta = provenance(exp.config_hash, device=",".join(s.device for s in specs), plan=str(plan_path),
                          launcher=mode, options=vars(options))
    finalize_output(out, ids)
    if row is not None:
        _append_row(runs_path(out), row, meta)
    return GenerateResult(out, len(ids), len(state.done), report, row)


def summary(result: GenerateResult) -> str:
    """One line: prompts, generated tokens, wall time, tokens/s, prompts/s, measured vs predicted."""
    if result.row is None:
        return f"{result.out}: all {result.total} prompts already complete"
    r = result.row
    resumed = f", {r['prompts_resumed']} done before" if r["prompts_resumed"] else ""
    return (f"{result.out}: {r['prompts']} prompts{resumed}, {r['generated_tokens']} tokens in {r['wall_s']:.2f} s: "
            f"{r['tokens_per_s']:.1f} tok/s, {r['prompts_per_s']:.2f} prompts/s (predicted "
            f"{r['predicted_tokens_per_s']:.1f} tok/s, {r['rel_error']:+.1%}); {r['eos_stops']} stopped at EOS, "
            f"mode {r['mode']}")


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(SIGTERM_EXIT_CODE)


def cli_generate(exp: Experiment, args: Any) -> int:
    """`llmpq generate [plan=PATH] [prompts=FILE] [out=PATH]`: completions for every prompt of the file."""
    results = Path(args.results)
    key = (results, exp.model.name, exp.cluster.name, exp.workload.name, exp.solver.name)
    plan_path = args.plan or paths.plan_path(*key)
    out = args.out or paths.output_path(*key)
    infeasible = infeasible_record(plan_path)
    if infeasible is not None:  # a method that cannot fit: no completions, an empty runs table
        print(write_skipped("generate", infeasible, {"generate_runs": runs_path(Path(out))}, [Path(out)],
                            exp.config_hash))
        return 0
    options = GenerateOptions.from_raw(exp.raw.get("generate"))
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        result = generate(exp, plan_path, out, getattr(args, "prompts", None), options, results)
    except PromptsError as exc:
        print(f"llmpq generate: input error: {exc}", file=sys.stderr)
        return 2
    except StageRefusal as exc:
        print(f"llmpq generate: {exc}", file=sys.stderr)
        return 3
    except DeployError as exc:
        print(f"llmpq generate: error: {exc}; completions so far are in {partial_path(out)}, run again to resume",
              file=sys.stderr)
        return 1
    print(summary(result))
    return 0
