"""Byte counts as people read them."""

from __future__ import annotations

UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def format_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit it reaches, 3 significant digits: '1.5 GiB', '2.25 MiB', '512 B'."""
    for name, size in UNITS:
        if abs(n) >= size:
            return f"{n / size:.3g} {name}"
    return f"{n:.0f} B"
