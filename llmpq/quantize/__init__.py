"""llmpq.quantize."""
