"""Sensitivity indicators ω[layer, bits] (`llmpq calibrate`) and the Σω → perplexity map (`llmpq ppl-map`).

For the solver (no torch imported): `load_ppl_map(path)` → `PplMap.predict(omega_sum)` /
`PplMap.omega_budget(max_ppl_increase_pct)`, and `read_omega(path, indicator)` / `omega_sum`.
"""

from .ppl_map import DEFAULT_INDICATOR, PplMap, load_ppl_map
from .table import omega_sum, read_omega

__all__ = ["DEFAULT_INDICATOR", "PplMap", "load_ppl_map", "omega_sum", "read_omega"]
