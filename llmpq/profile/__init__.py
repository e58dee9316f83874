"""llmpq.profile."""
