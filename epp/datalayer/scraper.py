"""Scrape every endpoint's /metrics, concurrently, on a thread of its own.

Each endpoint has its own loop task, so a slow or hanging server delays only its
own samples (a timeout ends each attempt). The scraper runs its own asyncio loop
on a separate thread: a burst of scrapes never queues behind, or in front of, the
request path. Results land as one attribute store of an immutable snapshot.

The client is aiohttp (C HTTP parser, keep-alive): a scrape costs about a tenth of
the CPU it did with httpx, which matters at 20 scrapes a second per endpoint on the
same interpreter (and GIL) as the pick.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer.engines import EngineMapping, MetricSpec
from epp.datastore import Datastore, Endpoint, EndpointMetrics

log = logging.getLogger(__name__)

MAX_METRICS_BYTES = 8 << 20  # a model server's /metrics is tens of KB; refuse anything absurd


class MetricsParseError(ValueError):
    pass


def _samples(text: str, mapping: EngineMapping) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of just the families the mapping needs; other lines are skipped unparsed."""
    prefixes = tuple(mapping.names)
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(prefixes))
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    if not wanted:
        return out
    try:
        for family in text_string_to_metric_families(wanted + "\n"):
            for s in family.samples:
                if s.name in mapping.names:
                    out.setdefault(s.name, []).append((s.labels, s.value))
    except ValueError as e:
        raise MetricsParseError(f"malformed metrics text: {e}") from None
    return out


def _first(samples: dict[str, list[tuple[dict[str, str], float]]], specs: tuple[MetricSpec, ...]) -> float | None:
    for spec in specs:
        for labels, value in samples.get(spec.name, ()):
            if spec.matches(labels):
                return value
    return None


def _adapters(text: str) -> frozenset[str]:
    return frozenset(a for a in (p.strip() for p in text.split(",")) if a)


def extract(text: str, mapping: EngineMapping, now: float, own_inflight: int = 0) -> tuple[EndpointMetrics, list[str]]:
    """Turn /metrics text into a snapshot; also returns the names of signals that were missing.
    `own_inflight`: epp's requests in flight to the server while it was scraped."""
    samples = _samples(text, mapping)
    missing = []
    values: dict[str, float | None] = {}
    expected = [key for key in ("queue", "running", "kv_usage") if getattr(mapping, key)]
    for key in ("queue", "running", "kv_usage"):
        if not getattr(mapping, key):  # the engine has no such signal (Triton without TensorRT-LLM: no KV cache)
            values[key] = None
            continue
        v = _first(samples, getattr(mapping, key))
        if v is not None:
            try:
                v = float(v)  # the text parser gives an int for an integer literal, of any size
            except OverflowError:
                v = math.inf
        if v is not None and not (math.isfinite(v) and v >= 0):
            # NaN, +-Inf or negative: this scrape tells nothing; the last good one ages into unknown.
            raise MetricsParseError(f"{getattr(mapping, key)[0].name} is {v}")
        if v is None:
            missing.append(getattr(mapping, key)[0].name)
        values[key] = v
    if len(missing) == len(expected):
        raise MetricsParseError(f"none of the expected metrics ({', '.join(missing)}) were found")

    active: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()
    max_lora = 0
    for spec in mapping.lora_info:
        series = [(labels, v) for labels, v in samples.get(spec.name, ()) if spec.matches(labels)]
        if series:
            # vLLM emits one series per state change; its value is a timestamp: newest wins.
            labels, _ = max(series, key=lambda lv: lv[1])
            active = _adapters(labels.get("running_lora_adapters", ""))
            waiting = _adapters(labels.get("waiting_lora_adapters", ""))
            try:
                max_lora = int(labels.get("max_lora", "0") or 0)
            except ValueError:
                max_lora = 0
            break

    block_size, num_blocks = _cache_config(samples, mapping)
    kv = values["kv_usage"] or 0.0
    m = EndpointMetrics(
        waiting=int(values["queue"] or 0),
        running=int(values["running"] or 0),
        kv_usage=kv / 100.0 if kv > 1.0 else kv,  # some servers report percent
        active_adapters=active,
        waiting_adapters=waiting,
        max_lora=max_lora,
        scraped_at=now,
        cache_block_size=block_size,
        cache_num_blocks=num_blocks,
        own_inflight=own_inflight,
    )
    return m, missing


def _label_int(labels: dict[str, str], name: str) -> int:
    try:
        v = int(float(labels.get(name, "") or 0))
    except (ValueError, OverflowError):  # "None" when the server does not know yet
        return 0
    return max(0, v)


def _gauge_int(samples: dict[str, list[tuple[dict[str, str], float]]], specs: tuple[MetricSpec, ...]) -> int:
    v = _first(samples, specs)
    try:
        return max(0, int(v)) if v is not None and math.isfinite(v) else 0
    except OverflowError:
        return 0


def _cache_config(samples: dict[str, list[tuple[dict[str, str], float]]], mapping: EngineMapping) -> tuple[int, int]:
    """(tokens per block, blocks), from the info gauge's labels or the engine's two gauges; 0 when absent."""
    block_size = num_blocks = 0
    for spec in mapping.cache_info:
        series = [labels for labels, _ in samples.get(spec.name, ()) if spec.matches(labels)]
        if series:
            block_size = _label_int(series[0], mapping.cache_block_size_label)
            num_blocks = _label_int(series[0], mapping.cache_num_blocks_label)
            break
    if mapping.cache_block_size:
        block_size = _gauge_int(samples, mapping.cache_block_size) or block_size
    if mapping.cache_num_blocks:
        num_blocks = _gauge_int(samples, mapping.cache_num_blocks) or num_blocks
    return block_size, num_blocks


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The body, refusing (without reading on) one past MAX_METRICS_BYTES."""
    if (resp.content_length or 0) > MAX_METRICS_BYTES:
        raise MetricsParseError(f"metrics response of {resp.content_length} bytes is too large")
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > MAX_METRICS_BYTES:
            raise MetricsParseError(f"metrics response of more than {MAX_METRICS_BYTES} bytes is too large")
    return bytes(body)


class MetricsScraper:
    """Keeps `Endpoint.metrics` fresh for every endpoint in the datastore."""

    def __init__(
        self,
        datastore: Datastore,
        mapping_for: Callable[[Endpoint], EngineMapping],
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        path: str = "/metrics",
        scheme: str = "http",
        verify_tls: bool = False,
        ca_cert_path: str | None = None,
        client_cert: tuple[str, str] | None = None,
    ) -> None:
        self.datastore = datastore
        self.mapping_for = mapping_for
        self.interval = interval
        self.timeout = timeout
        self.path = path
        self.scheme = scheme
        self.verify_tls = verify_tls
        self.ca_cert_path = ca_cert_path
        self.client_cert = client_cert
        self._ssl = self._ssl_context()  # built now: a bad CA or key file is a start-up error
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self._client: aiohttp.ClientSession | None = None
        self._stopped = threading.Event()
        self._started = threading.Event()

    def _ssl_context(self) -> ssl.SSLContext | bool:
        """https scrapes: verify (against the system's CAs or `ca_cert_path`) or not, with an optional
        client certificate; plain False when none of that is asked for (aiohttp's unverified default)."""
        if not self.verify_tls and not self.client_cert:
            return False
        if self.verify_tls:
            ctx = ssl.create_default_context(cafile=self.ca_cert_path)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert:
            ctx.load_cert_chain(*self.client_cert)
        return ctx

    # --- lifecycle (called from the main thread) ----------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)
        self._thread.start()
        self._started.wait()
        self.datastore.subscribe(self._on_change)
        self._on_change(self.datastore.all_endpoints(), [])

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._stopped.is_set():
            return
        self._stopped.set()
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._shutdown()))
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _on_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        loop = self._loop
        if loop is not None and not self._stopped.is_set():
            loop.call_soon_threadsafe(self._apply_change, list(added), list(removed))

    # --- the scraper's own thread --------------------------------------------
    def _run(self) -> None:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency
            loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._client = loop.run_until_complete(self._new_client())
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _new_client(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=self._ssl),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            # Uncompressed: on a pod network, inflating costs more CPU than the bytes saved.
            headers={"Accept-Encoding": "identity"},
        )

    def _apply_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for ep in removed:
            task = self._tasks.pop(ep, None)
            if task is not None:
                task.cancel()
        for ep in added:
            if ep not in self._tasks:
                self._tasks[ep] = asyncio.get_running_loop().create_task(self._scrape_loop(ep))

    async def _shutdown(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        if self._client is not None:
            await self._client.close()
        asyncio.get_running_loop().stop()

    async def _scrape_loop(self, ep: Endpoint) -> None:
        url = ep.metrics_url(self.path, self.scheme)
        healthy = True
        while True:
            started = time.monotonic()
            error = await self.scrape_once(ep, url)
            if error is None and not healthy:
                log.info("metrics of %s are back", ep.name)
            elif error is not None and healthy:
                log.warning("cannot read metrics of %s: %s (its state counts as unknown)", ep.name, error)
            healthy = error is None
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def scrape_once(self, ep: Endpoint, url: str | None = None) -> str | None:
        """One scrape; returns an error message, or None on success."""
        assert self._client is not None
        url = url or ep.metrics_url(self.path, self.scheme)
        # epp's in-flight count while the server counts its requests, read without a lock (one int):
        # the most of before and after, so a request epp saw end mid-scrape is not taken for another client's.
        before = ep.inflight
        try:
            async with self._client.get(url) as resp:
                if resp.status != 200:
                    raise MetricsParseError(f"HTTP {resp.status} from {url}")
                body = await _read_capped(resp)
            metrics, missing = extract(body.decode("utf-8", "replace"), self.mapping_for(ep), time.monotonic(),
                                       own_inflight=max(before, ep.inflight))
        except TimeoutError:
            error = f"timed out after {self.timeout:g}s"
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as e:
            # Refused or cut: the server is down (killed, restarting), not slow. Forget its last
            # snapshot now, so it counts as unknown at once rather than after the staleness threshold.
            ep.metrics = None
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        except aiohttp.ClientError as e:
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        except MetricsParseError as e:
            error = str(e)
        except Exception as e:  # whatever a server sends, the scrape loop lives on
            log.debug("scrape of %s failed", url, exc_info=True)
            error = f"cannot read metrics: {type(e).__name__}: {e}"
        else:
            ep.metrics = metrics
            ep.scrape_error = f"missing metrics: {', '.join(missing)}" if missing else None
            return None
        ep.scrape_error = error
        return error
