"""Completions out: the JSONL file, its in-progress twin, its sidecar, and resuming from them.

One line per prompt: `{"id", "completion", "prompt_tokens", "completion_tokens", "finish_reason"}`
(`eos` or `length`), plus `"truncated": K` where `overlong: truncate_left` cut K prompt tokens and
`"token_ids"` where `generate.token_ids` asks for them. The completion is the decoded text of the
generated tokens without the end-of-sequence token; `completion_tokens` counts every generated token,
the end-of-sequence token included.

While the job runs, lines go to `<out>.partial` in the order sequences finish, appended a wave at a time
(every B completions, and at the end) with flush and fsync, so a kill loses at most the completions since
the last wave. When every prompt has its line, the lines are written to `<out>` in input order (atomic
rename) and the partial file is removed: the final file does not depend on when or how often the job was
interrupted. `<out stem>.meta.json` records what the output is made from (the plan's and the prompts
file's sha256, max_new_tokens, stop, the end-of-sequence ids); a later run with other inputs is refused,
naming both sets of hashes. Resuming reads `<out>.partial` (or a finished `<out>`), skips every complete
id and drops a truncated last line.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..artifacts import atomic_path, write_text
from ..data.prompts import PromptsError

FINISH_REASONS = ("eos", "length")
ON_CHANGE = ("refuse", "restart")


def partial_path(out: str | Path) -> Path:
    """Where completions accumulate while the job runs: `<out>.partial`."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def meta_path(out: str | Path) -> Path:
    """The sidecar that names an output's inputs: `<out stem>.meta.json`."""
    out = Path(out)
    return out.with_name(out.stem + ".meta.json")


def runs_path(out: str | Path) -> Path:
    """The generate runs table of an output: `<out stem>.runs.parquet`."""
    out = Path(out)
    return out.with_name(out.stem + ".runs.parquet")


@dataclass(frozen=True)
class OutputIdentity:
    """What an output is made from: the plan and prompts file (sha256) and the generation settings."""

    plan_sha256: str
    prompts_sha256: str
    max_new_tokens: int
    stop: str
    eos: tuple[int, ...]
    overlong: str

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "eos": list(self.eos)}, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def read(path: str | Path) -> "OutputIdentity":
        data = json.loads(Path(path).read_text())
        return OutputIdentity(**{**data, "eos": tuple(data["eos"])})

    def differences(self, other: "OutputIdentity") -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [k for k in mine if mine[k] != theirs[k]]


def completion_line(ident: str | int, text: str, prompt_tokens: int, tokens: Sequence[int], finish: str,
                    truncated: int = 0, token_ids: bool = False) -> str:
    """One output line (JSON, newline-terminated)."""
    if finish not in FINISH_REASONS:
        raise ValueError(f"finish reason {finish!r} is not one of {', '.join(FINISH_REASONS)}")
    line: dict[str, Any] = {"id": ident, "completion": text, "prompt_tokens": prompt_tokens,
                            "completion_tokens": len(tokens), "finish_reason": finish}
    if truncated:
        line["truncated"] = truncated
    if token_ids:
        line["token_ids"] = list(tokens)
    return json.dumps(line, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class Existing:
    """Complete lines already on disk (raw text by id) and the byte length of the part that is whole."""

    lines: dict[Any, str]
    good_bytes: int
    dropped_tail: bool


def id_key(ident: Any) -> Any:
    """Ids compare by JSON type and value (1 and "1" are different ids)."""
    return (type(ident).__name__, ident)


def read_existing(path: Path, known: set[Any]) -> Existing:
    """The complete lines of an output or partial file; a last line cut short (no newline, or not JSON) is
    dropped; any other bad line, an unknown id or a repeated one is refused (PromptsError, exit 2)."""
    if not path.is_file():
        return Existing({}, 0, False)
    data = path.read_bytes()
    lines: dict[Any, str] = {}
    offset, number = 0, 0
    while offset < len(data):
        number += 1
        cut = data.find(b"\n", offset)
        last = cut < 0
        raw = data[offset:] if last else data[offset:cut + 1]
        try:
            obj = json.loads(raw.decode("utf-8"))
            ok = isinstance(obj, dict) and "id" in obj and obj.get("finish_reason") in FINISH_REASONS
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if last or not ok:
            if last or cut == len(data) - 1:
                return Existing(lines, offset, True)
            raise PromptsError(str(path), f"line {number}", "not a complete output line (the file is damaged; "
                                                            "remove it to start over)")
        key = id_key(obj["id"])
        if key not in known:
            raise PromptsError(str(path), f"line {number}", f"id {obj['id']!r} is not in the prompts file")
        if key in lines:
            raise PromptsError(str(path), f"line {number}", f"id {obj['id']!r} appears twice")
        lines[key] = raw.decode("utf-8")
        offset = cut + 1
    return Existing(lines, offset, False)


@dataclass(frozen=True)
class ResumeState:
    """Where a run starts: the ids already complete (keys of `_id_key`) and whether the output is final."""

    done: dict[Any, str]
    final: bool


def prepare_output(out: Path, identity: OutputIdentity, ids: Sequence[Any], on_change: str = "refuse") -> ResumeState:
    """Check an existing output against `identity` and find what is done; a new output gets its sidecar.

    A sidecar with other inputs is refused with both sets of hashes (PromptsError), unless `on_change` is
    restart (the workflow's choice: Snakemake has decided the output is stale), which starts over.
    """
    if on_change not in ON_CHANGE:
        raise ValueError(f"on_change {on_change!r} is not one of {', '.join(ON_CHANGE)}")
    partial, meta = partial_path(out), meta_path(out)
    if meta.is_file():
        found = OutputIdentity.read(meta)
        changed = found.differences(identity)
        if changed and on_change == "refuse":
            raise PromptsError(str(out), "inputs", f"was written from plan sha256 {found.plan_sha256} and prompts "
                               f"sha256 {found.prompts_sha256}; this run has plan sha256 {identity.plan_sha256} and "
                               f"prompts sha256 {identity.prompts_sha256} (differing: {', '.join(changed)}); "
                               f"choose another out= or remove {out}, {partial.name} and {meta.name}")
        if changed:
            for path in (out, partial, meta):
                path.unlink(missing_ok=True)
    elif any(p.is_file() and p.stat().st_size for p in (out, partial)):
        raise PromptsError(str(out), "inputs", f"exists without its sidecar {meta.name}, so what it was made from "
                                               "is unknown; choose another out= or remove it")
    if not meta.is_file():
        write_text(identity.to_json(), meta)
    known = {id_key(i) for i in ids}
    if out.is_file():
        existing = read_existing(out, known)
        return ResumeState(existing.lines, not existing.dropped_tail and len(existing.lines) == len(known))
    existing = read_existing(partial, known)
    if existing.dropped_tail:
        with open(partial, "r+b") as f:
            f.truncate(existing.good_bytes)
    return ResumeState(existing.lines, False)


class CompletionWriter:
    """Appends output lines to the partial file a wave at a time (write, flush, fsync)."""

    def __init__(self, partial: Path, wave: int, after_wave: Callable[[], None] | None = None):
        self.partial, self.wave, self.after_wave = Path(partial), max(1, wave), after_wave
        self.buffer: list[str] = []

    def add(self, lines: Sequence[str]) -> None:
        self.buffer.extend(lines)
        if len(self.buffer) >= self.wave:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write("".join(self.buffer))
            f.flush()
            os.fsync(f.fileno())
        self.buffer = []
        if self.after_wave is not None:
            self.after_wave()


def finalize_output(out: Path, ids: Sequence[Any]) -> int:
    """Write `<out>` from the partial file in input order (atomically) and remove the partial; lines written.

    Refuses (ValueError) unless every id has exactly one line."""
    partial = partial_path(out)
    known = [id_key(i) for i in ids]
    lines = read_existing(partial, set(known)).lines if partial.is_file() else {}
    missing = [i for i, k in zip(ids, known) if k not in lines]
    if missing:
        raise ValueError(f"{partial}: {len(missing)} prompts have no completion (first: {missing[:5]})")
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(lines[k] for k in known))
            f.flush()
            os.fsync(f.fileno())
    partial.unlink()
    return len(known)


def load_output(out: str | Path) -> list[Mapping[str, Any]]:
    """The lines of an output file, parsed."""
    return [json.loads(line) for line in Path(out).read_text(encoding="utf-8").splitlines() if line.strip()]
