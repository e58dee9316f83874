"""Which `prompts:` values name a prompts file and which a text source to sample from (no torch, no config).

**Which `prompts:` is a file.** A workload's `prompts:` names either a text source that fixed-length
prompts are sampled from, or a file of the user's own prompts:

- a text source: a shipped source's name (`shakespeare`, `pydoc`) or a value with a text-source scheme
  prefix (`file:PATH`, `jsonl:PATH:FIELD`), which wins over any suffix;
- a prompts file: any other value ending in `.jsonl` or `.parquet`, a path relative to the working
  directory (the workflow directory);
- anything else is refused at config time.
"""

from __future__ import annotations

import re

from .text import SOURCES

PROMPT_SUFFIXES = (".jsonl", ".parquet")
TEXT_SCHEMES = ("file", "jsonl")  # text sources that take an argument (llmpq.data.text)
OVERLONG_MODES = ("error", "truncate_left")
STOP_MODES = ("eos", "none")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9_+.-]*):")


def prompts_kind(value: str) -> str:
    """`source` (sample from a text source) or `file` (a prompts file), by the rule of the module docstring;
    ValueError explaining the rule otherwise."""
    if value in SOURCES:
        return "source"
    scheme = _SCHEME.match(value)
    if scheme and scheme.group(1).lower() in TEXT_SCHEMES:
        return "source"
    if value.lower().endswith(PROMPT_SUFFIXES):
        return "file"
    raise ValueError(f"{value!r} is neither a text source ({', '.join(sorted(SOURCES))}, "
                     f"{', '.join(s + ':...' for s in TEXT_SCHEMES)}) nor a prompts file (a path ending in "
                     f"{' or '.join(PROMPT_SUFFIXES)})")
