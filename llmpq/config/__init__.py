"""llmpq.config."""
