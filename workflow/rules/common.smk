"""Config composition and SLURM requests for the rules (imports llmpq.config, llmpq.slurm and the plan reader: no torch, so dry runs stay fast)."""

import errno
import json
import os
import shlex
import sys
from pathlib import Path

from llmpq import paths
from dataclasses import asdict
from functools import lru_cache

from llmpq.config import ConfigError, ConfigSearch, compose_experiment, load_device
from llmpq.config.compose import CONFIG_DIR_ENV
from llmpq.artifacts import file_sha256
from llmpq.slurm.hetjob import plan_job
from llmpq.slurm.request import plugin_resources
from llmpq.slurm.resources import SlurmOptions
from llmpq.slurm.script import job_name
from llmpq.slurm.site import SiteSettings
from llmpq.solve.plan import read_plan
from llmpq.models.resources import calibrate_resources, import_resources, perplexity_resources, quantize_resources
from llmpq.models.source import is_import_source, model_shape
from llmpq.progress import PROGRESS_FD_ENV
from llmpq.sensitivity.ppl_map import DEFAULT_POINTS
from llmpq.sensitivity.table import END_TO_END

RESULTS = Path(config.get("results_dir", "results"))
CONFIG_DIR = config.get("config_dir")
if CONFIG_DIR:
    # Jobs find the user's config groups through the environment, so the directory's path is in no rule's
    # command line: only the content of the configs a rule reads (its params) decides whether it reruns.
    os.environ[CONFIG_DIR_ENV] = str(Path(CONFIG_DIR).resolve())
_COMPOSED = {}
IMPORT_DEFAULT_MB = 16000      # import_model of a model whose shape is unknown before import


def experiment(model, cluster, workload="", solver=""):
    """The composed, validated experiment for one combination (cached per combination)."""
    key = (model, cluster, workload, solver)
    if key not in _COMPOSED:
        overrides = [f"model={model}", f"cluster={cluster}"]
        overrides += [f"workload={workload}"] if workload else []
        overrides += [f"solver={solver}"] if solver else []
        _COMPOSED[key] = config_or_exit(compose_experiment, overrides, config_dir=CONFIG_DIR)
    return _COMPOSED[key]


def config_or_exit(compose, *args, **kwargs):
    """`compose(...)`, or one line on stderr and exit 2 for a bad config (as `llmpq` verbs do), no traceback."""
    try:
        return compose(*args, **kwargs)
    except ConfigError as exc:
        print(f"llmpq workflow: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def experiment_entries():
    """`experiments:` of the config, or the named set of `experiment_sets:` (`--config experiments=real`)."""
    entries = config.get("experiments", [])
    if isinstance(entries, str):
        sets = config.get("experiment_sets") or {}
        if entries not in sets:
            print(f"llmpq workflow: config error: experiments={entries}: no such set under experiment_sets in "
                  f"conf/config.yaml (known: {', '.join(sorted(sets))})", file=sys.stderr)
            raise SystemExit(2)
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
def _device_spec(device):
    return load_device(device, config_dir=CONFIG_DIR)


@lru_cache(maxsize=None)
def _device(device):
    return asdict(config_or_exit(_device_spec, device))


def device_slice(device):
    """The device's config as a dict: the params of every rule that times or plans for it."""
    return _device(device)


TIMING_KEYS = ("name", "kind", "threads", "bits", "compute_capability", "kernels")


def kernel_table():
    """The weight-kernel table (conf/kernels.yaml) as composed: what profile, solve and deploy depend on."""
    return experiment("tiny-opt", "local-cpu").raw["kernels"]
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


def prompts_file_of(model, cluster, workload):
    """The workload's prompts file as an input ([] for a workload that samples its prompts)."""
    found = experiment(model, cluster, workload).workload.prompts_file
    return [found] if found else []


def prompts_sha256(model, cluster, workload):
    """sha256 of the workload's prompts file ("" if none): a param, so a changed file reruns solve and after."""
    found = prompts_file_of(model, cluster, workload)
    return file_sha256(found[0]) if found and Path(found[0]).is_file() else ""


def generate_outputs(model, cluster, workload, solvers):
    """The batch job's runs tables, for a workload with a prompts file (evaluate compares them)."""
    if not prompts_file_of(model, cluster, workload):
        return []
    return [str(paths.output_path(RESULTS, model, cluster, workload, s).with_suffix(".runs.parquet")) for s in solvers]


def quality_inputs(model):
    if not has_weights(model):
        return []
    return [str(paths.sensitivity_path(RESULTS, model)), str(paths.ppl_map_path(RESULTS, model))]


def eval_targets():
    """The evaluation table of every experiment whose model has weights here (plans of the others are shape-only)."""
    return sorted({str(paths.eval_path(RESULTS, m, c, w)) for m, c, w, _ in experiments() if has_weights(m)})


def all_targets():
    targets = set(eval_targets())
    targets.update(str(paths.plan_path(RESULTS, m, c, w, s)) for m, c, w, s in experiments() if not has_weights(m))
    if targets & set(eval_targets()):
        targets.add(str(paths.summary_path(RESULTS)))
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
            for solver in ("llmpq", "pipeedge", "uniform", "adabits", "uniform-best"):
                out.append(str(paths.plan_path(RESULTS, data["model"], cluster, workload, solver)))
    return out


def without_slurm(devices):
    """Raw device configs without their `slurm:` blocks: where a job runs is no input of what it computes."""
    return {stem: {k: v for k, v in spec.items() if k != "slurm"} for stem, spec in devices.items()}


def gpu_request(device, count=1):
    """SLURM resources of a rule that runs on `count` devices of one type, from its config's `slurm:` block.

    Keys of snakemake-executor-plugin-slurm: `gpu` + `gpu_model` or `gres`, and `slurm_partition` / `constraint`
    where the block (or LLMPQ_SLURM_PARTITION) sets them; a device without a block requests nothing.
    """
    return plugin_resources(_device_spec(device).slurm, SiteSettings.from_env(), count)


def plan_launcher():
    """How a rule that runs a plan starts its stages: `sbatch` (one SLURM job of its own, heterogeneous where the
    plan needs it) under the Snakemake SLURM executor, else the config's `deploy.launcher`."""
    plugin = workflow.executor_plugin
    return "sbatch" if plugin is not None and plugin.name == "slurm" else config["deploy"]["launcher"]


def plan_slurm_job(plan_file, rule):
    """One line for dry runs: the SLURM job that `rule` submits for this plan under the SLURM executor."""
    Path(plan_file).stat()  # a plan still to be made: FileNotFoundError naming it, which Snakemake shows as <TBD>
    plan = read_plan(plan_file)
    devices = {s.device: _device_spec(s.device) for s in plan.stages}
    name = job_name(rule, plan.model, plan.cluster, plan.workload, plan.method)
    return plan_job(plan, devices, name, SlurmOptions.from_raw(config.get("slurm")), SiteSettings.from_env()).summary()


def plan_devices(plan_file):
    """Device stems of a plan's stages, in pipeline order (none for a method recorded as infeasible)."""
    # a plan still to be made: FileNotFoundError naming it, which Snakemake shows as <TBD>
    return [stage["device"] for stage in json.loads(Path(plan_file).read_text())["stages"]]


def stage_cpus(plan_file):
    """CPUs per deploy task under SLURM: the most threads any stage's device uses (1 for a GPU stage's host)."""
    return max((device_slice(d).get("threads") or 1 for d in plan_devices(plan_file)), default=1)


def generate_gpu_request(plan_file):
    """GPUs of a batch job submitted through the SLURM plugin: one per stage, of the plan's first GPU type.

    Unlike deploy, `generate` does not yet submit a heterogeneous job of its own: a plan that mixes GPU types
    requests the first stage's type (see the README's limitations).
    """
    devices = plan_devices(plan_file)
    if not devices:  # an infeasible method: deploy only records that it was skipped
        return {"gpu": 0, "gpu_model": "", "gres": ""}
    gpus = [d for d in devices if device_slice(d).get("kind") != "cpu"]
    return gpu_request(gpus[0], len(gpus)) if gpus else gpu_request(devices[0])


ENVS = Path(workflow.basedir) / "envs"


def env_for_kinds(kinds):
    """The conda environment (`--sdm conda`) of a job that runs on these device kinds: envs/cuda.yaml (CUDA torch,
    GPTQModel's GPU kernels) where any is a GPU, else envs/llmpq.yaml (CPU torch)."""
    return str(ENVS / ("cuda.yaml" if "gpu" in set(kinds) else "llmpq.yaml"))


def device_env(device):
    """The environment of a job on one device type (profile)."""
    return env_for_kinds([device_slice(device)["kind"]])


def cluster_env(model, cluster):
    """The environment of a job that runs on a cluster's devices (profile_links, deploy, generate: a plan's
    stages are all CPUs or all GPUs). From the config, not the plan: a conda directive may not read an input."""
    devices = experiment(model, cluster).devices
    return env_for_kinds(devices[d].kind for d in experiment(model, cluster).cluster.device_stems())


def llmpq(verb):
    """The command line of one verb, with the workflow's results dir; its progress lines go to descriptor 3, which
    each rule's shell keeps open on the console (`3>&2` before the log redirection; `llmpq.progress`)."""
    return f"{PROGRESS_FD_ENV}=3 llmpq {verb} results={shlex.quote(str(RESULTS))}"
