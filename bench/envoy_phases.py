"""Where a request's time goes inside Envoy: an access-log format of phase durations, and its summary.

`bench/run --envoy-phases` gives every Envoy it starts this access log. The phase that
tells routers apart is "pick": from the last byte of the client's request to the first
byte sent to the pod. Envoy alone (round-robin, the oracle) spends tens of microseconds
there; with epp it is the whole pick hop (Envoy -> epp -> Envoy).
"""

from __future__ import annotations

import statistics
from pathlib import Path

# (name, from, to): Envoy's %COMMON_DURATION% time points.
PHASES = (
    ("receive", "DS_RX_BEG", "DS_RX_END"),  # the client's request, first byte to last
    ("pick", "DS_RX_END", "US_TX_BEG"),  # the filters before the router: epp's pick, if any
    ("pod_headers", "US_TX_END", "US_RX_BEG"),  # the pod reads the request and starts its answer
    ("to_client", "US_RX_BEG", "DS_TX_BEG"),  # the response headers, back through the filters
    ("total", "DS_RX_BEG", "DS_TX_BEG"),  # request in to response headers out
)
FORMAT = " ".join(f"%COMMON_DURATION({a}:{b}:us)%" for _, a, b in PHASES) + "\n"


def summarize(path: Path) -> dict[str, float]:
    """p50 and mean of each phase in ms (`pick_p50`, `pick_mean`, ...), over the requests the log holds.

    Envoy writes "-" for a phase it did not see (a request answered before reaching a pod); those
    requests are left out of that phase. No log (an Envoy that never started) gives {}.
    """
    columns: list[list[float]] = [[] for _ in PHASES]
    for line in path.read_text().splitlines() if path.exists() else ():
        for col, field in zip(columns, line.split(), strict=False):
            if field.isdigit():
                col.append(int(field) / 1e3)
    out: dict[str, float] = {}
    for (name, _, _), col in zip(PHASES, columns, strict=True):
        if col:
            out[f"{name}_p50"] = statistics.median(col)
            out[f"{name}_mean"] = statistics.fmean(col)
    return out
