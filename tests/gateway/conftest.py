"""One `epp gateway` (with a real Envoy) and the simulators of every example pod, for all the gateway
tests that need them; each test installs its own manifests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gateway_harness import Gateway


@pytest.fixture(scope="session")
def gateway() -> Iterator[Gateway]:
    gw = Gateway(time_scale=0.1)
    try:
        yield gw.start("node-update")
    finally:
        gw.stop()
