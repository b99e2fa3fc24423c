"""Latency epp adds per request: Envoy → epp → server vs the same Envoy config routing directly.

Both gateways run side by side in one run, from the same bootstrap; the direct one has
the ext_proc filter removed and the client names the pod itself in
x-gateway-destination-endpoint. Requests alternate between the two, so machine noise
hits both alike. Prints p50/p99 of each and the difference (the added latency).

    python -m bench.overhead [--requests 2000] [--mode FULL_DUPLEX_STREAMED|BUFFERED]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import httpx

from bench.stack import Stack, StackOptions, _http_ok, free_ports, wait_until
from epp.envoy import EnvoyOptions, EnvoyProcess, render

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class DirectEnvoy(EnvoyProcess):
    """The same bootstrap without the ext_proc filter: Envoy alone, routing on the client's header."""

    def config(self) -> dict[str, Any]:
        cfg = render(self.opts)
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
        clusters = cfg["static_resources"]["clusters"]
        cfg["static_resources"]["clusters"] = [c for c in clusters if c["name"] != "ext_proc"]
        return cfg

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(lambda: _http_ok(f"http://127.0.0.1:{self.opts.admin_port}/ready"), timeout, "direct envoy")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead")
    ap.add_argument("--requests", type=int, default=2000, help="per gateway")
    ap.add_argument("--mode", default="FULL_DUPLEX_STREAMED", help="request/response body mode for epp's Envoy")
    args = ap.parse_args()

    opts = StackOptions(servers=1, request_body_mode=args.mode, response_body_mode=args.mode,
                        sim_args=["--time-scale", "0"],
                        epp_args=["--seed", "1"])
    with Stack(opts) as stack:
        listen, admin = free_ports(2)
        direct = DirectEnvoy(EnvoyOptions(listen, 0, admin))
        direct.start()
        try:
            direct.wait_ready()
            pod = stack.endpoints[0]
            body = {"model": MODEL, "prompt": "The quick brown fox " * 50, "max_tokens": 1}
            via_epp, straight = [], []
            with httpx.Client(base_url=stack.url, timeout=10) as a, \
                    httpx.Client(base_url=direct.url, timeout=10) as b:
                for _ in range(50):  # warm both paths
                    a.post("/v1/completions", json=body)
                    b.post("/v1/completions", json=body, headers={"x-gateway-destination-endpoint": pod})
                for _ in range(args.requests):
                    t = time.perf_counter()
                    ra = a.post("/v1/completions", json=body)
                    via_epp.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    rb = b.post("/v1/completions", json=body, headers={"x-gateway-destination-endpoint": pod})
                    straight.append(time.perf_counter() - t)
                    if ra.status_code != 200 or rb.status_code != 200:
                        raise RuntimeError(f"request failed: {ra.text} / {rb.text}")
        finally:
            direct.stop()

    ms = 1000.0
    print(f"mode={args.mode}  requests={args.requests} per gateway, one connection each, alternating")
    print(f"{'':22}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, xs in (("Envoy direct", straight), ("Envoy + epp", via_epp)):
        print(f"{name:22}{pct(xs, 50) * ms:10.3f}{pct(xs, 90) * ms:10.3f}{pct(xs, 99) * ms:10.3f}"
              f"{statistics.mean(xs) * ms:10.3f}")
    print(f"{'added by epp':22}{(pct(via_epp, 50) - pct(straight, 50)) * ms:10.3f}"
          f"{(pct(via_epp, 90) - pct(straight, 90)) * ms:10.3f}{(pct(via_epp, 99) - pct(straight, 99)) * ms:10.3f}"
          f"{(statistics.mean(via_epp) - statistics.mean(straight)) * ms:10.3f}")
    print(f"ratio p50 (epp / direct): {pct(via_epp, 50) / pct(straight, 50):.2f}x")


if __name__ == "__main__":
    main()
