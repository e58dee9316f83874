"""llmpq.data: named text sources and their train / calib / eval splits."""

from llmpq.data.text import (
    SOURCES,
    SPLITS,
    Document,
    SourceUnavailableError,
    encode_split,
    load_split,
    sample_prompts,
    split_documents,
)

__all__ = [
    "SOURCES",
    "SPLITS",
    "Document",
    "SourceUnavailableError",
    "encode_split",
    "load_split",
    "sample_prompts",
    "split_documents",
]
