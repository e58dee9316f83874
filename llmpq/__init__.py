"""llmpq: joint pipeline partition, per-layer bit-width and micro-batch planning for LLM serving."""

__version__ = "0.1.0"
