"""`epp demo --rollout`: a node-update rollout, live, on loopback.

Starts simulated model servers for the node-update example's pods (pools `llm` and
`llm-new`), `epp gateway` over a copy of its manifests, and a stream of requests;
then edits the HTTPRoute as an operator would (90/10, 50/50, 0/100, and a rollback
to llm) and prints, for each step, how long the edit took to apply, how many
requests were in flight at the switch, where the requests went, and how many failed.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

EXAMPLE = resources.files("epp.gateway") / "examples" / "node-update"
ROUTE_FILE = "routes-to-llm.yaml"
STEPS = (((90, 10), "start: 10% to the new nodes"), ((50, 50), "half and half"), ((0, 100), "all on the new nodes"),
         ((100, 0), "roll back to the old nodes"))


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class _Load:
    """Requests from a few clients, every outcome kept: (started, ended, status, pool)."""

    def __init__(self, url: str, workers: int = 4) -> None:
        self.url, self.workers = url, workers
        self.outcomes: list[tuple[float, float, int, str]] = []
        self.stop = asyncio.Event()

    async def _worker(self, w: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                stream = i % 4 == 0
                body = {"model": "food-review", "prompt": f"client {w} request {i}: rate the ramen", "max_tokens": 4,
                        **({"stream": True, "max_tokens": 200} if stream else {})}
                started = time.time()
                try:
                    r = await client.post("/v1/completions", json=body)
                    pod = r.headers.get("x-simulator-pod", "")
                    ok = r.status_code == 200 and (not stream or r.text.rstrip().endswith("[DONE]"))
                    self.outcomes.append((started, time.time(), r.status_code if ok else -1, pod.rsplit("-", 1)[0]))
                except httpx.HTTPError:
                    self.outcomes.append((started, time.time(), 0, ""))

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(w) for w in range(self.workers)))


def _with_weights(route: str, *weights: int) -> str:
    values = iter(weights)
    return re.sub(r"weight: \d+", lambda _: f"weight: {next(values)}", route)


def _bar(n: int, total: int) -> str:
    return "#" * round(30 * n / total) if total else ""


async def _started_after(load: _Load, t: float, n: int) -> list[tuple[float, float, int, str]]:
    """The first `n` requests started after `t`, once they are done."""
    while True:
        after = [o for o in load.outcomes if o[0] > t]
        if len(after) >= n:
            return after[:n]
        await asyncio.sleep(0.05)


async def _steps(url: str, admin: str, manifests: Path, per_step: int) -> int:
    load = _Load(url)
    runner = asyncio.create_task(load.run())
    route = (manifests / ROUTE_FILE).read_text()
    failed = 0
    try:
        async with httpx.AsyncClient(base_url=admin, timeout=5) as status:
            for (old, new), label in STEPS:
                before = (await status.get("/status")).json()["generation"]
                text = _with_weights(route, old, new)
                edited = time.monotonic()
                tmp = manifests / f".{ROUTE_FILE}.tmp"
                tmp.write_text(text)
                os.replace(tmp, manifests / ROUTE_FILE)
                while (st := (await status.get("/status")).json())["generation"] <= before:
                    if st["last_error"] and st["last_error_at"] > time.time() - 5:
                        raise RuntimeError(st["last_error"])
                    await asyncio.sleep(0.02)
                took = time.monotonic() - edited
                switch = st["applied_at"]
                after = await _started_after(load, switch, per_step)
                in_flight = sum(1 for o in load.outcomes if o[0] < switch < o[1])
                counts = {p: sum(1 for o in after if o[3] == p) for p in ("llm", "llm-new")}
                errors = sum(1 for o in load.outcomes if o[2] != 200)
                print(f"\nweights llm {old:3} / llm-new {new:3}   {label}")
                print(f"  edit applied in {took * 1000:4.0f} ms; {in_flight} requests in flight at the switch")
                for pool, n in counts.items():
                    print(f"  {pool:8} {n:4}  {_bar(n, per_step)}")
                print(f"  failed so far: {errors} of {len(load.outcomes)}")
    finally:
        load.stop.set()
        await runner
    failed = sum(1 for o in load.outcomes if o[2] != 200)
    print(f"\n{len(load.outcomes)} requests through four live edits, {failed} failed; Envoy was never restarted.")
    return 0 if failed == 0 else 1


def run_rollout_demo(keep: bool = False, base_port: int = 18000, per_step: int = 200) -> int:
    """The demo; the exit status (1 if any request failed)."""
    listen, admin, envoy_admin, xds = base_port, base_port + 1, base_port + 2, base_port + 3
    with tempfile.TemporaryDirectory(prefix="epp-rollout-demo-") as tmp:
        manifests = Path(tmp) / "manifests"
        manifests.mkdir()
        for f in EXAMPLE.iterdir():
            if f.name.endswith(".yaml"):
                (manifests / f.name).write_text(f.read_text(encoding="utf-8"))
        logs = Path(tmp)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        procs: list[subprocess.Popen[bytes]] = []

        def spawn(name: str, args: list[str]) -> subprocess.Popen[bytes]:
            log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            p = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
            procs.append(p)
            return p

        def log(name: str) -> str:
            return (logs / f"{name}.log").read_text(errors="replace")[-3000:]

        print("node-update rollout: pools llm (old nodes) and llm-new (new nodes), two simulated vLLM servers each;")
        print(f"epp gateway with a real Envoy on 127.0.0.1:{listen}, its manifests in {manifests}")
        try:
            sims = spawn("simulators", ["-m", "epp.gateway.simulators", "--time-scale", "0.2",
                                        "--manifests", str(manifests)])
            _wait(lambda: sims.poll() is not None or "simulators ready" in log("simulators"), 30, "the simulators")
            if sims.poll() is not None:
                raise RuntimeError(log("simulators"))
            gw = spawn("gateway", ["-m", "epp.gateway", "gateway", "--manifests", str(manifests),
                                   "--address", "127.0.0.1", "--port-map", f"80={listen}", "--xds-port", str(xds),
                                   "--admin-port", str(admin), "--envoy-admin-port", str(envoy_admin),
                                   "--reload-interval", "100ms", "--drain-settle", "500ms"])

            def ready() -> bool:
                if gw.poll() is not None:
                    raise RuntimeError(f"epp gateway exited:\n{log('gateway')}")
                try:
                    return httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False
            _wait(ready, 60, "the gateway")
            status = asyncio.run(_steps(f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", manifests,
                                        per_step))
            if keep:
                print(f"\nup; edit {manifests / ROUTE_FILE} and watch http://127.0.0.1:{admin}/status; try:\n"
                      f"  curl 127.0.0.1:{listen}/v1/completions -H 'content-type: application/json' "
                      "-d '{\"model\":\"food-review\",\"prompt\":\"hello\",\"max_tokens\":5}'   (Ctrl-C stops)")
                try:
                    while gw.poll() is None:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
            return status
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
            shutil.rmtree(manifests, ignore_errors=True)
            print("demo finished: all processes stopped.")
