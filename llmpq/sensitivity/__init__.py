"""llmpq.sensitivity."""
