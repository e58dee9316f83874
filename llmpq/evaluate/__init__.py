"""llmpq.evaluate."""
