"""`llmpq <verb> [--config-dir DIR] [hydra overrides] [out=PATH] [plan=PATH] [...]`: verbs -> stage functions.

No logic lives here: each verb is `module:function` taking (Experiment, VerbArgs), imported only when
called (so `llmpq config` never imports torch).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, compose_experiment

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
    "evaluate": ("llmpq.evaluate.run:cli_evaluate", "compare methods: measured vs predicted, perplexity, plots"),
}

RESERVED = ("out", "plan", "device", "bits", "indicator", "results")


@dataclass(frozen=True)
class VerbArgs:
    """Options a verb receives besides the experiment: reserved key=value pairs and the config dir."""

    out: Path | None = None
    plan: Path | None = None
    device: str | None = None
    bits: int | None = None
    indicator: str | None = None
    results: Path = Path("results")
    config_dir: str | None = None
    overrides: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpq", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, text) in VERBS.items():
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("--config-dir", help="extra directory of config groups (device/, cluster/, ...)")
        p.add_argument("pairs", nargs="*", metavar="KEY=VALUE",
                       help=f"hydra overrides (cluster=paper-c3, workload.gen_len=200) or {', '.join(RESERVED)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    reserved, overrides = _split(args.pairs)
    try:
        bits = int(reserved["bits"]) if "bits" in reserved else None
    except ValueError:
        print(f"llmpq {args.verb}: bits: expected an integer, got {reserved['bits']!r}", file=sys.stderr)
        return 2
    try:
        exp = compose_experiment(overrides, config_dir=args.config_dir)
        results = Path(reserved.get("results") or exp.raw.get("results_dir") or "results")
        verb_args = VerbArgs(
            out=Path(reserved["out"]) if "out" in reserved else None,
            plan=Path(reserved["plan"]) if "plan" in reserved else None,
            device=reserved.get("device"), bits=bits, indicator=reserved.get("indicator"),
            results=results, config_dir=args.config_dir, overrides=tuple(overrides),
        )
        module, func = VERBS[args.verb][0].split(":")
        return int(getattr(importlib.import_module(module), func)(exp, verb_args) or 0)
    except ConfigError as exc:
        print(f"llmpq {args.verb}: config error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"llmpq {args.verb}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
