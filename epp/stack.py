"""A whole gateway on loopback: simulated model servers, epp and a real Envoy, as child processes.

The demo, the integration tests and the benchmarks all start it the same way, and
wait on conditions (health answers, a healthy ext_proc cluster), never on sleeps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.envoy import EnvoyOptions, EnvoyProcess


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(check, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class StackOptions:
    servers: int = 3
    epp_args: list[str] = field(default_factory=list)
    sim_args: list[str] = field(default_factory=list)
    request_body_mode: str = "FULL_DUPLEX_STREAMED"
    observe_responses: bool = True  # see EnvoyOptions
    response_body_mode: str = "FULL_DUPLEX_STREAMED"
    failure_mode_allow: bool = False
    layout: str = "ext-proc"  # or "http-pick" (see EnvoyOptions)
    tls: bool = True  # epp serves ext_proc over TLS (its default) and Envoy speaks TLS to it
    envoy: EnvoyOptions | None = None  # overrides the above when given (ports are filled in)
    base_port: int | None = None
    # One process per simulated server (each can be killed alone, as a pod), instead of one for all.
    process_per_server: bool = False


class Stack:
    def __init__(self, opts: StackOptions | None = None) -> None:
        self.opts = opts or StackOptions()
        n = self.opts.servers
        if self.opts.base_port:
            ports = list(range(self.opts.base_port, self.opts.base_port + n + 7))
        else:
            ports = free_ports(n + 7)
        self.sim_ports = ports[:n]
        (self.grpc_port, self.health_port, self.metrics_port, self.listen_port, self.admin_port,
         self.http_pick_port, self.explain_port) = ports[n:]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sim_procs: list[subprocess.Popen[bytes]] = []
        self.envoy: EnvoyProcess | None = None
        self._logdir = tempfile.TemporaryDirectory(prefix="epp-stack-")
        self.logdir = Path(self._logdir.name)

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sim_ports]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        try:
            return (self.logdir / f"{name}.log").read_text()[-6000:]
        except OSError:
            return ""

    def start_simulators(self) -> None:
        if self.opts.process_per_server:
            self.sim_procs = [self._spawn(f"simulator-{i}", [
                sys.executable, "-m", "epp.simulator", "--ports", str(port), "--name-prefix", f"sim{i}",
                *self.opts.sim_args]) for i, port in enumerate(self.sim_ports)]
        else:
            self.sim_procs = [self._spawn("simulators", [
                sys.executable, "-m", "epp.simulator", "--ports", ",".join(map(str, self.sim_ports)),
                *self.opts.sim_args,
            ])]
        for port in self.sim_ports:
            wait_until(lambda p=port: _http_ok(f"http://127.0.0.1:{p}/health"), 30,
                       f"simulator on port {port}\n{self.log('simulators')}")

    def kill_simulator(self, index: int) -> None:
        """SIGKILL one server's process, as a pod that dies (needs process_per_server)."""
        if not self.opts.process_per_server:
            raise RuntimeError("kill_simulator needs StackOptions(process_per_server=True)")
        proc = self.sim_procs[index]
        proc.kill()
        proc.wait()

    def start_epp(self, extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        proc = self._spawn("epp", [
            sys.executable, "-m", "epp", "serve",
            "--endpoints", ",".join(self.endpoints),
            "--grpc-port", str(self.grpc_port), "--grpc-health-port", str(self.health_port),
            "--metrics-port", str(self.metrics_port), "--http-pick-port", str(self.http_pick_port),
            "--explain-port", str(self.explain_port),
            "--bind-address", "127.0.0.1", "--drain-timeout=0s", *([] if self.opts.tls else ["--secure-serving=false"]),
            *self.opts.epp_args, *(extra or []),
        ])
        self.epp_proc = proc
        wait_until(lambda: proc.poll() is not None or self.epp_serving(), 30, f"epp health\n{self.log('epp')}")
        if proc.poll() is not None:
            raise RuntimeError(f"epp exited with {proc.returncode}:\n{self.log('epp')}")
        return proc

    def epp_serving(self) -> bool:
        return grpc_serving(self.health_port)

    def start_envoy(self) -> None:
        eo = self.opts.envoy or EnvoyOptions(0, 0, 0)
        eo.listen_port, eo.extproc_port, eo.admin_port = self.listen_port, self.grpc_port, self.admin_port
        eo.http_pick_port = self.http_pick_port
        eo.extproc_tls = self.opts.tls
        if eo.pool_endpoints is None:
            eo.pool_endpoints = self.endpoints  # Envoy knows the pool: it retries on the pick's fallbacks
        if self.opts.envoy is None:
            eo.layout = self.opts.layout
            eo.request_body_mode = self.opts.request_body_mode
            eo.response_body_mode = self.opts.response_body_mode
            eo.observe_responses = self.opts.observe_responses
            eo.failure_mode_allow = self.opts.failure_mode_allow
        self.envoy = EnvoyProcess(eo).start()
        self.envoy.wait_ready(30)

    def start(self) -> Stack:
        try:
            self.start_simulators()
            self.start_epp()
            self.start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop_epp(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        proc = self.epp_proc
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
            self.envoy = None
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._logdir.cleanup()


def grpc_serving(port: int) -> bool:
    """Whether the grpc.health.v1 server on this loopback port answers SERVING."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False
