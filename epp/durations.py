"""Go-style durations ("50ms", "2s", "1m30s"), as the Go EPP's flags and configs write them.

As Go's time.ParseDuration, less the sign: no interval or timeout epp reads can be
negative. A bare number (epp's addition, for configs written by hand) is seconds.
"""

from __future__ import annotations

import math
import re

_NUMBER = r"(?:\d+\.?\d*|\.\d+)"
_BARE = re.compile(rf"{_NUMBER}")
_PART = re.compile(rf"({_NUMBER})(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds, from a Go duration string or a number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"invalid duration {text!r}: must be a finite number of seconds, not negative")
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"invalid duration {text!r}")
    s = text.strip()
    if _BARE.fullmatch(s):
        return float(s)
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"invalid duration {text!r}: expected e.g. 50ms, 2s, 1m30s")
    return total
