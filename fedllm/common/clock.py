"""The one wall clock every service stamps records with (epoch milliseconds)."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the Unix epoch (wall clock; for deadlines and record timestamps)."""
    return int(time.time() * 1000)
