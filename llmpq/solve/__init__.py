"""llmpq.solve."""
