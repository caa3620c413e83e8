"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import os


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, rounded (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
