"""`llmpq <verb> [--config-dir DIR] [hydra overrides] [out=PATH] [plan=PATH] [...]`: verbs -> stage functions.

No logic lives here: each verb is `module:function` taking (Experiment, VerbArgs), imported only when
called (so `llmpq config` never imports torch).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .config import ConfigError, compose_experiment
from .data.text import SourceUnavailableError
from .data.prompts import PromptsError

VERBS: dict[str, tuple[str, str]] = {
    "config": ("llmpq.cli:print_config", "print the composed, validated config"),
    "tiny-model": ("llmpq.models.tiny:cli_build", "train and save the embedded tiny-opt model"),
    "import-model": ("llmpq.models.importer:cli_import_model",
                     "convert the model's source (gguf:<package>/<file>, a .gguf path) into an HF directory"),
    "profile": ("llmpq.profile.run:cli_profile", "time real layers of the model on one device type (device=STEM)"),
    "profile-links": ("llmpq.profile.links:cli_profile_links", "time stage-to-stage transfers of a present cluster"),
    "quantize": ("llmpq.quantize.run:cli_quantize", "quantize every layer to bits=B into per-layer files"),
    "calibrate": ("llmpq.sensitivity.run:cli_calibrate", "per-layer x bit-width sensitivity indicators"),
    "ppl-map": ("llmpq.sensitivity.ppl_map:cli_ppl_map", "fit summed sensitivity -> perplexity increase"),
    "ppl": ("llmpq.evaluate.perplexity:cli_ppl", "perplexity of the model, or of a plan's exact weights (plan=)"),
    "solve": ("llmpq.solve.run:cli_solve", "plan partition, bits and micro-batches for model x cluster x workload"),
    "explain": ("llmpq.solve.explain:cli_explain", "print a plan (plan=PATH) as a table"),
    "deploy": ("llmpq.runtime.launch:cli_deploy", "run a plan (plan=PATH) with one process per stage"),
    "generate": ("llmpq.generate.run:cli_generate", "the batch job: completions for a prompts file (prompts=FILE)"),
    "evaluate": ("llmpq.evaluate.run:cli_evaluate", "compare methods: measured vs predicted, perplexity, plots"),
    "summary": ("llmpq.evaluate.summary:cli_summary", "one HTML page with every evaluated experiment's result"),
    "export": ("llmpq.export.run:cli_export", "write a plan (plan=PATH) as an engine's model directory and launch "
                                              "script (engine=vllm|sglang out=DIR)"),
}

# Verbs about the tool itself: no experiment is composed, and they take their own arguments.
TOOLS: dict[str, tuple[str, str]] = {
    "slurm-profile": ("llmpq.slurm.profile_link:cli_slurm_profile",
                      "link profiles/slurm where `snakemake --profile slurm` finds it (install|show|remove)"),
}

RESERVED = ("out", "plan", "device", "bits", "indicator", "results", "engine", "prompts", "infeasible")


@dataclass(frozen=True)
class VerbArgs:
    """Options a verb receives besides the experiment: reserved key=value pairs and the config dir."""

    out: Path | None = None
    plan: Path | None = None
    device: str | None = None
    bits: int | None = None
    indicator: str | None = None
    engine: str | None = None
    prompts: Path | None = None
    results: Path = Path("results")
    config_dir: str | None = None
    overrides: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)
    infeasible: str = "fail"       # solve: fail (error, exit 1) | record (write the infeasibility as the plan, exit 0)
    started: float | None = None   # time.monotonic() when the command started (the solve's deadline counts from it)


def print_config(exp, args: VerbArgs) -> int:
    """Print the composed config as JSON (devices included)."""
    print(json.dumps({k: v for k, v in exp.raw.items()}, indent=2, sort_keys=True, default=str))
    return 0


def _split(pairs: list[str]) -> tuple[dict[str, str], list[str]]:
    reserved, overrides = {}, []
    for p in pairs:
        key = p.split("=", 1)[0]
        if "=" in p and key in RESERVED:
            reserved[key] = p.split("=", 1)[1]
        else:
            overrides.append(p)
    return reserved, overrides


INFEASIBLE_MODES = ("fail", "record")

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "gptqmodel", "transformers")


def quiet_third_party() -> None:
    """Hide third-party deprecation notices and import chatter on a terminal (logs and --debug keep them)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


def _message(exc: BaseException) -> str:
    """One line for an error: its text (a KeyError's without quotes), or its type for an empty one."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return str(text) or type(exc).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpq", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llmpq {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, text) in VERBS.items():
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("--config-dir", help="extra directory of config groups (device/, cluster/, ...), searched "
                                            "before the shipped conf/ (default: $LLMPQ_CONFIG_DIR)")
        p.add_argument("--debug", action="store_true", help="show tracebacks and third-party warnings")
        p.add_argument("pairs", nargs="*", metavar="KEY=VALUE",
                       help=f"hydra overrides (cluster=paper-c3, workload.gen_len=200) or {', '.join(RESERVED)}")
    tool = sub.add_parser("slurm-profile", help=TOOLS["slurm-profile"][1], description=TOOLS["slurm-profile"][1])
    tool.add_argument("action", nargs="?", choices=("install", "show", "remove"), default="show")
    tool.add_argument("--name", default="slurm", help="profile name (default: slurm)")
    tool.add_argument("--force", action="store_true", help="replace a directory of that name")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Exit codes: 0 done, 2 bad configuration or arguments, 1 any other failure (one line on
    stderr naming what to change; `--debug` shows the traceback)."""
    started = time.monotonic()
    args = _parser().parse_args(argv)
    if args.verb in TOOLS:
        module, func = TOOLS[args.verb][0].split(":")
        return int(getattr(importlib.import_module(module), func)(args) or 0)
    if not args.debug and sys.stderr.isatty():
        quiet_third_party()
    reserved, overrides = _split(args.pairs)
    try:
        bits = int(reserved["bits"]) if "bits" in reserved else None
    except ValueError:
        print(f"llmpq {args.verb}: bits: expected an integer, got {reserved['bits']!r}", file=sys.stderr)
        return 2
    if reserved.get("infeasible", "fail") not in INFEASIBLE_MODES:
        print(f"llmpq {args.verb}: infeasible: expected one of {', '.join(INFEASIBLE_MODES)}, got "
              f"{reserved['infeasible']!r}", file=sys.stderr)
        return 2
    try:
        exp = compose_experiment(overrides, config_dir=args.config_dir, cluster_defaults=True)
        results = Path(reserved.get("results") or exp.raw.get("results_dir") or "results")
        verb_args = VerbArgs(
            out=Path(reserved["out"]) if "out" in reserved else None,
            plan=Path(reserved["plan"]) if "plan" in reserved else None,
            device=reserved.get("device"), bits=bits, indicator=reserved.get("indicator"),
            engine=reserved.get("engine"),
            prompts=Path(reserved["prompts"]) if "prompts" in reserved else None,
            results=results, config_dir=args.config_dir, overrides=tuple(overrides),
            infeasible=reserved.get("infeasible", "fail"), started=started,
        )
        module, func = VERBS[args.verb][0].split(":")
        return int(getattr(importlib.import_module(module), func)(exp, verb_args) or 0)
    except PromptsError as exc:
        if args.debug:
            raise
        print(f"llmpq {args.verb}: input error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"llmpq {args.verb}: config error: {exc}", file=sys.stderr)
        return 2
    except SourceUnavailableError as exc:
        if args.debug:
            raise
        print(f"llmpq {args.verb}: missing package: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmpq {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure becomes one message; --debug re-raises for the traceback
        if args.debug:
            raise
        expected = isinstance(exc, (ValueError, OSError, KeyError))
        kind = "error" if expected else f"internal error ({type(exc).__name__}; --debug shows the traceback)"
        print(f"llmpq {args.verb}: {kind}: {_message(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
