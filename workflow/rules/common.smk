"""Config composition for the rules (imports llmpq.config only: no torch, so dry runs stay fast)."""

import errno
import json
import shlex
from pathlib import Path

from llmpq import paths
from dataclasses import asdict
from functools import lru_cache

from llmpq.config import ConfigError, ConfigSearch, compose_experiment, load_device
from llmpq.models.resources import calibrate_resources, import_resources, perplexity_resources, quantize_resources
from llmpq.models.source import is_import_source, model_shape
from llmpq.sensitivity.ppl_map import DEFAULT_POINTS
from llmpq.sensitivity.table import END_TO_END

RESULTS = Path(config.get("results_dir", "results"))
CONFIG_DIR = config.get("config_dir")
CONFIG_DIR_ARG = f"--config-dir {shlex.quote(str(Path(CONFIG_DIR).resolve()))}" if CONFIG_DIR else ""
_COMPOSED = {}
IMPORT_DEFAULT_MB = 16000      # import_model of a model whose shape is unknown before import


def experiment(model, cluster, workload="", solver=""):
    """The composed, validated experiment for one combination (cached per combination)."""
    key = (model, cluster, workload, solver)
    if key not in _COMPOSED:
        overrides = [f"model={model}", f"cluster={cluster}"]
        overrides += [f"workload={workload}"] if workload else []
        overrides += [f"solver={solver}"] if solver else []
        _COMPOSED[key] = compose_experiment(overrides, config_dir=CONFIG_DIR)
    return _COMPOSED[key]


def experiment_entries():
    """`experiments:` of the config, or the named set of `experiment_sets:` (`--config experiments=real`)."""
    entries = config.get("experiments", [])
    if isinstance(entries, str):
        sets = config.get("experiment_sets") or {}
        if entries not in sets:
            raise ValueError(f"experiments={entries}: no such set under experiment_sets in conf/config.yaml "
                             f"(known: {', '.join(sorted(sets))})")
        entries = sets[entries]
    return entries


def experiments():
    """Every (model, cluster, workload, solver) that `rule all` builds."""
    out = []
    for entry in experiment_entries():
        for solver in entry["solvers"]:
            out.append((entry["model"], entry["cluster"], entry["workload"], solver))
    return out


def has_weights(model):
    """A model whose weights are built or imported here, or found in a local directory, can be quantized and
    deployed."""
    spec = experiment(model, "local-cpu").model
    return model == "tiny-opt" or is_import_source(spec.source) or (Path(spec.source) / "config.json").is_file()


def model_slice(model):
    spec = experiment(model, "local-cpu").model
    return {"source": spec.source, "bits": list(spec.bits), "quant": vars(spec.quant), "hf_config": spec.hf_config}


@lru_cache(maxsize=None)
def _device(device):
    return asdict(load_device(device, config_dir=CONFIG_DIR))


def device_slice(device):
    """The device's config as a dict: the params of every rule that times or plans for it."""
    return _device(device)


TIMING_KEYS = ("name", "kind", "threads", "bits")
GPU_FIT_KEYS = ("memory_gib", "reserve_gib")


def timing_slice(device):
    """What a device's timings depend on: a CPU device's memory cap is a planning limit, not a physical one."""
    spec = device_slice(device)
    keys = TIMING_KEYS + (GPU_FIT_KEYS if spec["kind"] != "cpu" else ())
    return {k: spec[k] for k in keys}


def model_of_cluster(cluster):
    for m, c, _, _ in experiments():
        if c == cluster:
            return m
    return experiment("tiny-opt", cluster).cluster.model or "tiny-opt"


def sensitivity_slice(model):
    """What calibrate and ppl_map depend on beyond the text: the model's planner indicator (its config's
    `indicator`, else sensitivity.indicator) and the end-to-end sample count."""
    sensitivity = dict(config.get("sensitivity") or {})
    sensitivity["indicator"] = experiment(model, "local-cpu").model.indicator or sensitivity.get("indicator")
    return sensitivity


def model_weights(model):
    """Input that stands for the model's weights (the tiny model is built by a rule, a GGUF source imported)."""
    if model == "tiny-opt":
        return str(paths.tiny_model_dir(RESULTS) / "config.json")
    if is_import_source(experiment(model, "local-cpu").model.source):
        return str(paths.imported_model_dir(RESULTS, model) / "config.json")
    return []


def import_request(model):
    """`resources:` of import_model: from the shape the model config gives before import, else a default."""
    try:
        return asdict(import_resources(model_shape(experiment(model, "local-cpu").model, results=RESULTS)))
    except ConfigError:
        return {"mem_mb": IMPORT_DEFAULT_MB, "runtime": 60}


@lru_cache(maxsize=None)
def quality_resources(model, stage):
    """`resources:` of a heavy rule (quantize, calibrate, ppl_map, evaluate) from the model's shape (its
    weights exist when the job starts: the rules pass `input`, so Snakemake asks only then) and the
    calibration / eval settings (`llmpq.models.resources`); a GPU where calibration.device is cuda."""
    spec = experiment(model, "local-cpu").model
    try:
        shape = model_shape(spec, results=RESULTS)
    except ConfigError as exc:  # weights not built yet: Snakemake shows <TBD> and asks again when they are
        raise FileNotFoundError(errno.ENOENT, str(exc), model_weights(model)) from None
    calibration, evaluation = config["calibration"], config["eval"]
    gpu = calibration.get("device") == "cuda"
    windows = evaluation.get("max_windows") or 1000
    if stage == "quantize":
        found = quantize_resources(shape, calibration["samples"], calibration["seq_len"], gpu)
    elif stage == "calibrate":
        sensitivity = sensitivity_slice(model)
        end_to_end = sensitivity["indicator"] in END_TO_END
        samples = sensitivity["end_to_end_samples"] if end_to_end else None
        found = calibrate_resources(shape, calibration["samples"], calibration["seq_len"],
                                    sum(1 for b in spec.bits if b < 16), end_to_end, gpu, samples)
    elif stage == "ppl_map":
        found = perplexity_resources(shape, windows, evaluation["window"], len(spec.bits) + DEFAULT_POINTS, gpu)
    else:
        solvers = max(1, sum(1 for m, *_ in experiments() if m == model))
        found = perplexity_resources(shape, windows, evaluation["window"], solvers, gpu)
    return asdict(found)


def present_devices(cluster):
    exp = experiment(model_of_cluster(cluster), cluster)
    return exp.cluster.device_stems() if exp.cluster.present else []


def profiles_for(model, cluster):
    return [str(paths.profile_path(RESULTS, d, model)) for d in present_devices(cluster)]


def links_for(cluster):
    return [str(paths.links_path(RESULTS, cluster))] if present_devices(cluster) else []


def quant_manifests(model):
    spec = experiment(model, "local-cpu").model
    return [str(paths.quant_manifest_path(RESULTS, model, spec.quant.scheme, b)) for b in spec.bits]


def quality_inputs(model):
    if not has_weights(model):
        return []
    return [str(paths.sensitivity_path(RESULTS, model)), str(paths.ppl_map_path(RESULTS, model))]


def all_targets():
    targets = set()
    for model, cluster, workload, solver in experiments():
        if has_weights(model):
            targets.add(str(paths.eval_path(RESULTS, model, cluster, workload)))
        else:
            targets.add(str(paths.plan_path(RESULTS, model, cluster, workload, solver)))
    return sorted(targets)


def plan_only_targets():
    """Plans of every cluster config that names its model and workloads (the paper's clusters)."""
    import yaml

    search = ConfigSearch(config_dir=CONFIG_DIR)
    out = []
    for cluster in search.options("cluster"):
        data = yaml.safe_load(search.file("cluster", cluster).read_text()) or {}
        if not data.get("model"):
            continue
        for workload in data.get("workloads", []):
            for solver in ("llmpq", "pipeedge", "uniform", "adabits"):
                out.append(str(paths.plan_path(RESULTS, data["model"], cluster, workload, solver)))
    return out


def gpu_request(device, count=1):
    """SLURM GPU request of `count` devices of one type from its config's `slurm:` block.

    Keys are those of snakemake-executor-plugin-slurm: `gres` if the block gives one, else `gpu` and
    `gpu_model`; a CPU device requests nothing (0 and empty strings, which the plugin skips).
    """
    spec = device_slice(device)
    slurm = spec.get("slurm") or {}
    if spec.get("kind") == "cpu":
        return {"gpu": 0, "gpu_model": "", "gres": ""}
    if slurm.get("gres"):
        return {"gpu": 0, "gpu_model": "", "gres": f"{slurm['gres']}:{count}"}
    return {"gpu": count, "gpu_model": slurm.get("gpu_model", device), "gres": ""}


def plan_devices(plan_file):
    """Device stems of a plan's stages, in pipeline order."""
    return [stage["device"] for stage in json.loads(Path(plan_file).read_text())["stages"]]


def stage_cpus(plan_file):
    """CPUs per deploy task under SLURM: the most threads any stage's device uses (1 for a GPU stage's host)."""
    return max(device_slice(d).get("threads") or 1 for d in plan_devices(plan_file))


def deploy_gpu_request(plan_file):
    """GPUs for a deploy job: one per stage, of the plan's single GPU type.

    A plan that mixes GPU types needs a heterogeneous job, which the SLURM plugin does not build:
    such plans request the first stage's type and must be started by hand (see the README).
    """
    devices = plan_devices(plan_file)
    gpus = [d for d in devices if device_slice(d).get("kind") != "cpu"]
    return gpu_request(gpus[0], len(gpus)) if gpus else gpu_request(devices[0])


def llmpq(verb):
    """The command line of one verb, with the workflow's config dir and results dir."""
    return f"llmpq {verb} {CONFIG_DIR_ARG} results={shlex.quote(str(RESULTS))}"
