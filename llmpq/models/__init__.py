"""llmpq.models."""
