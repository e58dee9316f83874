"""llmpq.data."""
