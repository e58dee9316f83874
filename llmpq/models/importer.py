"""`llmpq import-model`: turn a model's `source` into an HF safetensors directory, once.

- `gguf:<package>/<file>`: a GGUF file shipped inside an installed Python package (found with
  `importlib.util.find_spec`, which does not import the package), or a path ending in `.gguf`:
  transformers dequantizes it into a float32 HF causal LM (needs the optional packages `gguf` and
  `accelerate`, the `real` extra), saved with its tokenizer (chat template included) to
  `results/models/{model}/`. GGUF weights were quantized (e.g. Q4_1) before this: the 16-bit model of
  every later stage is the dequantized one. The directory is built under a temporary name and renamed
  into place, so a crash never leaves one that looks complete. Memory: the whole model once in float32.
- a local HF directory with `config.json`: used as it is, nothing written.

Nothing is ever installed here: a missing package is a configuration error (exit 2) naming the command
that provides it.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..artifacts import file_sha256, staged_dir
from ..config import ConfigError, ModelSpec
from ..paths import imported_model_dir
from ..progress import bar as console_bar
from .shape import shape_from_model
from .source import GGUF_PREFIX, is_import_source

REAL_PACKAGES = ("gguf", "accelerate")
REAL_INSTALL = "pip install -e '.[real]'  (or: pip install gguf accelerate)"
IMPORT_FILE = "llmpq_import.json"


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote: the directory, the source file and its digest, the model's size, the time taken."""

    out_dir: str
    source: str
    gguf_file: str
    gguf_sha256: str
    model_type: str
    parameters: int
    seconds: float


def _file_of(spec: ModelSpec) -> str:
    return f"model/{spec.name}.yaml"


def _install_hint(spec: ModelSpec, package: str) -> str:
    return spec.install or f"pip install {package.replace('_', '-')}"


def locate_gguf(spec: ModelSpec) -> Path:
    """The GGUF file a `gguf:<package>/<file>` or `*.gguf` source names; ConfigError if it cannot be found."""
    if spec.source.startswith(GGUF_PREFIX):
        package, _, name = spec.source[len(GGUF_PREFIX):].partition("/")
        if not package or not name:
            raise ConfigError(_file_of(spec), "source", f"{spec.source!r}: expected gguf:<package>/<file>")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(_file_of(spec), "source", f"Python package {package!r} is not installed; install it "
                              f"with: {_install_hint(spec, package)}")
        directory = Path(list(found.submodule_search_locations)[0])
        path = directory / name
        if not path.is_file():
            present = sorted(p.name for p in directory.glob("*.gguf"))
            raise ConfigError(_file_of(spec), "source", f"package {package!r} has no file {name!r} "
                              f"(its GGUF files: {', '.join(present) or 'none'})")
        return path
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise ConfigError(_file_of(spec), "source", f"GGUF file {spec.source!r} not found")
    return path.resolve()


def check_real_packages(spec: ModelSpec) -> None:
    """ConfigError naming the install command if a package GGUF conversion needs is missing."""
    missing = [p for p in REAL_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(_file_of(spec), "source", f"reading a GGUF file needs the package(s) {', '.join(missing)}; "
                          f"install them with: {REAL_INSTALL}")


def import_gguf(spec: ModelSpec, gguf: Path, out: Path) -> ImportReport:
    """Dequantize `gguf` into a float32 HF directory at `out` (atomically), with its tokenizer."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    shape = shape_from_model(model)
    # The GGUF loader leaves the model marked as quantized, and save_pretrained then refuses it ("not
    # serializable"); the weights are plain float32 tensors by now, so drop the marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    report = ImportReport(str(out), spec.source, gguf.name, file_sha256(gguf), model.config.model_type, shape.params, 0.0)
    with staged_dir(out) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        report = ImportReport(**{**asdict(report), "seconds": round(time.perf_counter() - start, 3)})
        (stage / IMPORT_FILE).write_text(json.dumps(asdict(report), indent=2, sort_keys=True) + "\n")
    return report


def cli_import_model(exp: Any, args: Any) -> int:
    """`llmpq import-model model=M [out=DIR]`: convert M's source into an HF directory (a directory: as is)."""
    spec = exp.model
    if not is_import_source(spec.source):
        local = Path(spec.source)
        if (local / "config.json").is_file():
            print(f"{spec.name}: source {spec.source} is an HF directory, used as it is")
            return 0
        raise ConfigError(_file_of(spec), "source", f"{spec.source!r} is neither a local directory with config.json "
                          f"nor a GGUF source (gguf:<package>/<file> or a .gguf path); no model hub is used")
    gguf = locate_gguf(spec)
    check_real_packages(spec)
    out = Path(args.out) if args.out else imported_model_dir(Path(args.results), spec.name)
    with console_bar(total=1, desc=f"import-model {spec.name} from {gguf.name}", unit="models", disable=True) as bar:
        report = import_gguf(spec, gguf, out)
        bar.update(1)
    print(f"{out}: {report.model_type}, {report.parameters:,} parameters from {gguf.name} "
          f"(dequantized to float32), {report.seconds:.1f} s")
    return 0
