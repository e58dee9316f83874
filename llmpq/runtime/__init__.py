"""llmpq.runtime."""
