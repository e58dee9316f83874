"""llmpq.costmodel."""
