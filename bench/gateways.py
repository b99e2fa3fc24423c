"""Envoys for comparisons: without epp (routing on the client's header, or load-balancing a static
pool), and with several epp replicas.

Both are rendered from the same bootstrap as the epp gateway (deploy/envoy.yaml),
with the ext_proc filter and cluster removed, so the only difference measured is
how the pod is chosen.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from epp.envoy import EnvoyOptions, EnvoyProcess, render

EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"


def _without_ext_proc(opts: EnvoyOptions) -> dict[str, Any]:
    cfg = render(opts)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"]
                           if f["typed_config"]["@type"] != EXT_PROC_TYPE]
    cfg["static_resources"]["clusters"] = [c for c in cfg["static_resources"]["clusters"] if c["name"] != "ext_proc"]
    return cfg


class _NoExtProcEnvoy(EnvoyProcess):
    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.opts.admin_port}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"envoy not ready after {timeout}s:\n{self.logs()}")


class DirectEnvoy(_NoExtProcEnvoy):
    """Envoy alone, routing to the pod the client names in x-gateway-destination-endpoint."""

    def config(self) -> dict[str, Any]:
        return _without_ext_proc(self.opts)


class PoolEnvoy(_NoExtProcEnvoy):
    """Envoy balancing a static list of pods with one of its own policies (ROUND_ROBIN, RANDOM, LEAST_REQUEST).

    ROUND_ROBIN is what a plain Kubernetes Service behind a gateway gives.
    """

    def __init__(self, opts: EnvoyOptions, endpoints: list[tuple[str, int]], lb_policy: str) -> None:
        super().__init__(opts)
        self.endpoints = endpoints
        self.lb_policy = lb_policy

    def config(self) -> dict[str, Any]:
        cfg = _without_ext_proc(self.opts)
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        for vhost in hcm["route_config"]["virtual_hosts"]:
            for route in vhost["routes"]:
                route["route"]["cluster"] = "pool"
        cfg["static_resources"]["clusters"].append({
            "name": "pool",
            "type": "STATIC",
            "connect_timeout": "5s",
            "lb_policy": self.lb_policy,
            "load_assignment": {"cluster_name": "pool", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                for host, port in self.endpoints
            ]}]},
        })
        return cfg


class ReplicaEnvoy(EnvoyProcess):
    """The epp gateway with more epp replicas in its ext_proc cluster, as behind a Service of several
    epp pods. With the response observer, RANDOM rather than the bootstrap's ROUND_ROBIN: each request
    then opens two ext_proc streams (the pick and the observer), so with one Envoy worker round robin
    would send every pick to the same replica and every observer stream to the other. With GIE's
    single filter, one stream per request, round robin as shipped."""

    def __init__(self, opts: EnvoyOptions, extra_extproc_ports: list[int]) -> None:
        super().__init__(opts)
        self.extra_ports = extra_extproc_ports

    def config(self) -> dict[str, Any]:
        cfg = render(self.opts)
        cluster = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "ext_proc")
        if self.opts.observe_responses:
            cluster["lb_policy"] = "RANDOM"
        lbs = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        for port in self.extra_ports:
            lbs.append({"endpoint": {"address": {"socket_address": {
                "address": self.opts.extproc_address, "port_value": port}}}})
        return cfg
