"""Model adapters: shapes from HF configs or weights, the tiny embedded model."""
