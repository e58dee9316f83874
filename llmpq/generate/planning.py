"""A prompts file as the planner and the runtime see it: validated prompts and the planning shape they give.

For a workload that names a prompts file, the planning shape comes from the file: B = `batch`,
n = `max_new_tokens`, s = the mean prompt length for time (`PromptStats.planning_len`) and the longest
prompt for memory (`WorkloadSpec.max_prompt_len`: the plan keeps KV for B sequences of the longest prompt
+ n). The plan records the file's sha256 and the statistics used.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError, Experiment, WorkloadSpec
from ..artifacts import file_sha256
from ..data.prompts import PromptStats, TokenizedPrompt, prompt_stats, read_prompt_rows, tokenize_prompts
from ..models.shape import shape_from_config
from ..models.source import hf_config_dict, model_dir


@dataclass(frozen=True)
class PromptsInput:
    """A validated prompts file: where it is, its prompts in input order and their statistics."""

    path: Path
    prompts: tuple[TokenizedPrompt, ...]
    stats: PromptStats


def load_tokenizer(exp: Experiment) -> Any:
    """The model's tokenizer (from its local directory)."""
    from transformers import AutoTokenizer

    weights = model_dir(exp.model)
    if weights is None:
        raise ConfigError(f"model/{exp.model.name}.yaml", "source", f"{exp.model.source!r} is not a local model "
                          "directory: a prompts file needs the model's tokenizer")
    return AutoTokenizer.from_pretrained(str(weights))


def read_prompts(exp: Experiment, path: str | Path | None = None, tokenizer: Any = None) -> PromptsInput:
    """Read, tokenise and validate a prompts file (default: the workload's) against the model's context
    minus the workload's n; PromptsError (exit 2) lists every problem."""
    w = exp.workload
    path = Path(path if path is not None else (w.prompts_file or ""))
    rows = read_prompt_rows(path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(exp)
    max_positions = shape_from_config(hf_config_dict(exp.model)).max_positions
    prompts = tokenize_prompts(path, rows, tokenizer, max_positions - w.gen_len, w.overlong, exp.model.name)
    return PromptsInput(path, tuple(prompts), prompt_stats(file_sha256(path), prompts))


def planning_workload(workload: WorkloadSpec, stats: PromptStats) -> WorkloadSpec:
    """The workload with the shape of a prompts file: s = its planning length, the longest prompt for memory."""
    return replace(workload, prompt_len=stats.planning_len, max_prompt_len=stats.max_tokens)


def planning_experiment(exp: Experiment) -> tuple[Experiment, PromptsInput | None]:
    """The experiment as the planner sees it: a prompts-file workload gets its shape from the file."""
    if exp.workload.prompts_file is None:
        return exp, None
    found = read_prompts(exp)
    return replace(exp, workload=planning_workload(exp.workload, found.stats)), found
