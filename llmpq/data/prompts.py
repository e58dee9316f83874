"""A user's prompts file: reading it, validating it, its length statistics.

Which `prompts:` values name a file: `llmpq.data.prompt_source`.

**The file.** JSONL: one JSON object per line (blank lines are skipped) with `id` (a string or an
integer, unique) and either `prompt` (text, tokenised as the model's tokenizer does by default) or
`messages` (a list of `{role, content}`, rendered with the tokenizer's chat template and a generation
prompt; a tokenizer without a template is refused). Parquet: the same columns.

**Validation**, before any work, all problems in one error (exit 2): a line that is not a JSON object,
lacks an id or a prompt, or has a malformed one is named by file and line; duplicate ids, empty prompts
and prompts longer than the model's context minus `max_new_tokens` are named by id. With
`overlong: truncate_left` an overlong prompt keeps its last tokens and its output line says how many
were cut.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from ..config.errors import ConfigError
from .prompt_source import OVERLONG_MODES

MAX_LISTED = 12  # problems listed per kind in one error


class PromptsError(ConfigError):
    """A prompts file that cannot be used as it is; names the file and every problem found."""


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the prompts need."""

    chat_template: Any

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class PromptRow:
    """One prompt as the file gives it: its id and either its text or its chat messages."""

    id: str | int
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    where: str                  # "line 3" (JSONL) or "row 3" (Parquet)


def _listed(problems: Sequence[str]) -> str:
    shown = list(problems[:MAX_LISTED])
    if len(problems) > MAX_LISTED:
        shown.append(f"... and {len(problems) - MAX_LISTED} more")
    return "; ".join(shown)


def _row(obj: Any, where: str) -> tuple[PromptRow | None, str | None]:
    """A PromptRow from one parsed line or row, or the problem with it."""
    if not isinstance(obj, dict):
        return None, f"{where}: expected a JSON object, got {type(obj).__name__}"
    ident = obj.get("id")
    if ident is None:
        return None, f"{where}: missing id"
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        return None, f"{where}: id must be a string or an integer, got {ident!r}"
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        return None, f"{where} (id {ident!r}): give exactly one of prompt or messages"
    if prompt is not None:
        if not isinstance(prompt, str):
            return None, f"{where} (id {ident!r}): prompt must be a string, got {type(prompt).__name__}"
        return PromptRow(ident, prompt, None, where), None
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        return None, f"{where} (id {ident!r}): messages must be a list of {{role, content}} strings"
    return PromptRow(ident, None, tuple({"role": m["role"], "content": m["content"]} for m in messages), where), None


def _jsonl_objects(path: Path) -> Iterable[tuple[str, Any, str | None]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line), None
            except json.JSONDecodeError as exc:
                yield f"line {number}", None, f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})"


def _parquet_objects(path: Path) -> Iterable[tuple[str, Any, str | None]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"id"} - set(table.column_names)
    if missing or not {"prompt", "messages"} & set(table.column_names):
        raise PromptsError(str(path), "columns", f"a prompts table needs id and prompt or messages, has "
                                                 f"{table.column_names}")
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", {k: v for k, v in row.items() if v is not None}, None


def read_prompt_rows(path: str | Path) -> list[PromptRow]:
    """Every prompt of a JSONL or Parquet file; PromptsError naming the file and each bad line or row."""
    path = Path(path)
    if not path.is_file():
        raise PromptsError(str(path), "prompts", "no such prompts file")
    reader = _parquet_objects if path.suffix.lower() == ".parquet" else _jsonl_objects
    rows, problems = [], []
    try:
        for where, obj, problem in reader(path):
            row, problem = (None, problem) if problem else _row(obj, where)
            if problem:
                problems.append(problem)
            else:
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise PromptsError(str(path), "encoding", f"not UTF-8 text: {exc}") from None
    if problems:
        raise PromptsError(str(path), "prompts", _listed(problems))
    if not rows:
        raise PromptsError(str(path), "prompts", "the file holds no prompts")
    return rows


@dataclass(frozen=True)
class TokenizedPrompt:
    """A validated prompt: its id, its token ids and how many tokens `truncate_left` cut (0: none)."""

    id: str | int
    ids: tuple[int, ...]
    truncated: int = 0


def _encode(tokenizer: ChatTokenizer, row: PromptRow) -> list[int]:
    if row.prompt is not None:
        return list(tokenizer(row.prompt, verbose=False)["input_ids"]) if row.prompt.strip() else []
    text = tokenizer.apply_chat_template(list(row.messages or ()), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def tokenize_prompts(path: str | Path, rows: Sequence[PromptRow], tokenizer: ChatTokenizer, limit: int,
                     overlong: str = "error", model: str = "the model") -> list[TokenizedPrompt]:
    """Token ids of every row; PromptsError naming, by id, duplicates, empty prompts and prompts over `limit`
    tokens (unless `overlong` is truncate_left: then they keep their last `limit` tokens)."""
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong: {overlong!r} is not one of {', '.join(OVERLONG_MODES)}")
    if limit < 1:
        raise PromptsError(str(path), "max_new_tokens", f"leaves no room for a prompt (limit {limit} tokens)")
    seen: dict[Any, str] = {}
    duplicates, empty, too_long, chat = [], [], [], []
    out = []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    for row in rows:
        if row.id in seen:
            duplicates.append(f"{row.id!r} ({seen[row.id]} and {row.where})")
            continue
        seen[row.id] = row.where
        if row.messages is not None and not has_template:
            chat.append(repr(row.id))
            continue
        ids = _encode(tokenizer, row)
        if not ids:
            empty.append(repr(row.id))
        elif len(ids) > limit and overlong == "error":
            too_long.append(f"{row.id!r} ({len(ids)} tokens)")
        else:
            cut = max(0, len(ids) - limit)
            out.append(TokenizedPrompt(row.id, tuple(ids[cut:]), cut))
    problems = []
    if duplicates:
        problems.append(f"duplicate ids: {', '.join(duplicates[:MAX_LISTED])}")
    if empty:
        problems.append(f"empty prompts, ids: {', '.join(empty[:MAX_LISTED])}")
    if too_long:
        problems.append(f"prompts longer than {limit} tokens (the context of {model} minus max_new_tokens; "
                        f"`overlong: truncate_left` keeps their last tokens), ids: {', '.join(too_long[:MAX_LISTED])}")
    if chat:
        problems.append(f"messages need a chat template and the tokenizer of {model} has none (give prompt text, "
                        f"or a model whose tokenizer_config.json has chat_template), ids: {', '.join(chat[:MAX_LISTED])}")
    for kind, items in (("duplicate", duplicates), ("empty", empty), ("overlong", too_long), ("chat", chat)):
        if len(items) > MAX_LISTED:
            problems.append(f"... {len(items) - MAX_LISTED} more {kind}")
    if problems:
        raise PromptsError(str(path), "prompts", "; ".join(problems))
    return out


@dataclass(frozen=True)
class PromptStats:
    """What planning needs of a prompts file: its hash, size and prompt lengths (tokens)."""

    sha256: str
    count: int
    min_tokens: int
    mean_tokens: float
    p50_tokens: int
    p90_tokens: int
    max_tokens: int
    truncated: int              # prompts cut by truncate_left

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "PromptStats":
        return PromptStats(**data)

    @property
    def planning_len(self) -> int:
        """s for the time model: the mean prompt (prompts are batched longest first, so a micro-batch pads
        little beyond its own lengths); memory is planned for `max_tokens`."""
        return max(1, math.ceil(self.mean_tokens))


def _percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """The nearest-rank percentile of sorted values."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return int(sorted_values[rank - 1])


def prompt_stats(sha256: str, prompts: Sequence[TokenizedPrompt]) -> PromptStats:
    """Length statistics of validated prompts."""
    lengths = sorted(len(p.ids) for p in prompts)
    return PromptStats(sha256=sha256, count=len(lengths), min_tokens=lengths[0],
                       mean_tokens=round(sum(lengths) / len(lengths), 6), p50_tokens=_percentile(lengths, 0.5),
                       p90_tokens=_percentile(lengths, 0.9), max_tokens=lengths[-1],
                       truncated=sum(1 for p in prompts if p.truncated))
