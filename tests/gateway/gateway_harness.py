"""A running `epp gateway` (real Envoy) over a directory of manifests, simulators for every example pod,
and a load generator that records every request's outcome.

One gateway serves all the rollout tests: each test puts its scenario's manifests in the watched
directory (the example manifests of deploy/gateway-examples, the ones the rollout guide shows) and
waits until /status says they are applied; edits go the same way. Nothing here sleeps for a fixed
time: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from epp.stack import free_ports

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "gateway-examples"
SCENARIOS = ("node-update", "base-model", "lora-adapter", "multi-model", "mirroring")


def scenario_files(scenario: str) -> dict[str, str]:
    return {f.name: f.read_text() for f in sorted((EXAMPLES / scenario).iterdir()) if f.suffix == ".yaml"}


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Gateway:
    """`python -m epp.gateway gateway` over `self.dir`, with its simulators."""

    def __init__(self, time_scale: float = 0.1) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="epp-gateway-test-")
        self.root = Path(self._tmp.name)
        # The watched path is a link to a directory of manifests: a whole scenario is swapped in at once.
        self.dir = self.root / "manifests"
        self._generation = 0
        self.listen_port, self.admin_port, self.envoy_admin_port = free_ports(3)
        self.time_scale = time_scale
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        try:
            return (self.root / f"{name}.log").read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def start(self, scenario: str) -> Gateway:
        sims = self._spawn("simulators", ["-m", "epp.gateway.simulators", "--time-scale", str(self.time_scale),
                                          "--manifests", *(str(EXAMPLES / s) for s in SCENARIOS)])
        self.put(scenario)
        wait_for(lambda: sims.poll() is not None or "simulators ready" in self.log("simulators"), 30,
                 "the simulators")
        if sims.poll() is not None:
            raise RuntimeError(f"simulators exited:\n{self.log('simulators')}")
        gw = self._spawn("gateway", [
            "-m", "epp.gateway", "gateway", "--manifests", str(self.dir), "--address", "127.0.0.1",
            "--port-map", f"80={self.listen_port}", "--xds-port", "0", "--admin-port", str(self.admin_port),
            "--envoy-admin-port", str(self.envoy_admin_port), "--envoy-concurrency", "1",
            "--reload-interval", "50ms", "--drain-settle", "300ms", "--drain-timeout", "10s",
            "--refresh-metrics-interval", "100ms", "--metrics-staleness-threshold", "1s", "--seed", "7"])
        wait_for(lambda: gw.poll() is not None or self._ready(), 60, f"the gateway\n{self.log('gateway')}")
        if gw.poll() is not None:
            raise RuntimeError(f"epp gateway exited with {gw.returncode}:\n{self.log('gateway')}")
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._tmp.cleanup()

    # --- manifests -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{self.admin_port}/status", timeout=5).json()

    def put(self, files: str | dict[str, str]) -> None:
        """Make the watched directory hold exactly these manifests (a scenario's name: its examples), at once."""
        if isinstance(files, str):
            files = scenario_files(files)
        self._generation += 1
        target = self.root / f"manifests-{self._generation}"
        target.mkdir()
        for name, text in files.items():
            (target / name).write_text(text)
        link = self.root / f".link-{self._generation}"
        link.symlink_to(target, target_is_directory=True)
        os.replace(link, self.dir)

    def write(self, name: str, text: str) -> None:
        """Replace one manifest as an editor's save does (a new file renamed over the old)."""
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.dir / name)

    def read(self, name: str) -> str:
        return (self.dir / name).read_text()

    def applied(self, after: int, timeout: float = 10.0) -> dict[str, Any]:
        """The status once a configuration newer than generation `after` is applied (fails on a refusal)."""
        def check() -> dict[str, Any] | None:
            st = self.status()
            if st["generation"] > after:
                return st
            if st["last_error"] and st["last_error_at"] > self._edit_wall:
                raise AssertionError(f"the gateway refused the manifests: {st['last_error']}")
            return None
        return wait_for(check, timeout, f"a configuration after generation {after}\n{self.log('gateway')}")

    def edit(self, change: Callable[[], None], timeout: float = 10.0) -> tuple[dict[str, Any], float]:
        """Apply `change` to the manifests; the status once applied and the seconds from edit to applied."""
        before = self.status()["generation"]
        self._edit_wall = time.time()
        started = time.monotonic()
        change()
        st = self.applied(before, timeout)
        return st, time.monotonic() - started

    def use(self, files: str | dict[str, str]) -> dict[str, Any]:
        st, _ = self.edit(lambda: self.put(files), timeout=20)
        return st

    _edit_wall = 0.0

    def sim_state(self, host: str, port: int = 8000) -> dict[str, Any]:
        return httpx.get(f"http://{host}:{port}/sim/state", timeout=5).json()

    def sim_control(self, host: str, body: dict[str, Any], port: int = 8000) -> None:
        httpx.post(f"http://{host}:{port}/sim/control", json=body, timeout=5).raise_for_status()


@dataclass
class Outcome:
    started: float  # time.time()
    ended: float
    status: int  # 0: no HTTP answer at all (connection error, reset)
    pod: str  # x-simulator-pod
    model: str  # the model the server says it ran
    streamed: bool
    error: str = ""


@dataclass
class Load:
    """Requests from `workers` concurrent clients until stopped; every outcome recorded."""

    url: str
    body: Callable[[int], dict[str, Any]]
    headers: Callable[[int], dict[str, str]] = lambda i: {}
    workers: int = 6
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _sent: int = 0

    async def _one(self, client: httpx.AsyncClient, i: int) -> None:
        body = self.body(i)
        started = time.time()
        self.in_flight += 1
        try:
            if body.get("stream"):
                async with client.stream("POST", "/v1/completions", json=body, headers=self.headers(i)) as r:
                    text = (await r.aread()).decode()
                    ok = r.status_code != 200 or text.rstrip().endswith("data: [DONE]")
                    self.outcomes.append(Outcome(started, time.time(), r.status_code if ok else -1,
                                                 r.headers.get("x-simulator-pod", ""), _stream_model(text), True,
                                                 "" if ok else "stream cut short"))
            else:
                r = await client.post("/v1/completions", json=body, headers=self.headers(i))
                model = r.json().get("model", "") if r.status_code == 200 else ""
                self.outcomes.append(Outcome(started, time.time(), r.status_code, r.headers.get("x-simulator-pod", ""),
                                             model, False, "" if r.status_code == 200 else r.text[:300]))
        except httpx.HTTPError as e:
            self.outcomes.append(Outcome(started, time.time(), 0, "", "", bool(body.get("stream")), repr(e)))
        finally:
            self.in_flight -= 1

    async def _worker(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                i = self._sent
                self._sent += 1
                await self._one(client, i)

    async def run(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.workers)))

    def stop(self) -> None:
        self._stop.set()

    async def until_started_after(self, t: float, n: int, timeout: float = 30.0) -> list[Outcome]:
        """Wait until `n` requests started after `t` have finished; those."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            done = [o for o in self.outcomes if o.started > t]
            if len(done) >= n:
                return done[:n]
            if loop.time() > deadline:
                raise TimeoutError(f"only {len(done)} of {n} requests finished after the change")
            await asyncio.sleep(0.02)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def in_flight_at(self, t: float) -> int:
        return sum(1 for o in self.outcomes if o.started < t < o.ended)


def _stream_model(text: str) -> str:
    import orjson

    for ln in text.splitlines():
        if ln.startswith("data: {"):
            return str(orjson.loads(ln[6:]).get("model", ""))
    return ""


def pools_of(outcomes: list[Outcome], pods_to_pool: Callable[[str], str]) -> Counter[str]:
    return Counter(pods_to_pool(o.pod) for o in outcomes)


def within(count: int, n: int, share: float, sigmas: float = 4.5) -> bool:
    """Whether `count` of `n` is a plausible draw at probability `share` (a binomial, `sigmas` wide)."""
    if share in (0.0, 1.0):
        return count == round(share * n)
    sd = (n * share * (1 - share)) ** 0.5
    return abs(count - n * share) <= sigmas * sd + 1
