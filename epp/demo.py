"""`epp demo`: Envoy + epp + three simulated model servers on loopback, and a handful of requests.

Prints which pod served each request and why (every candidate's scores, from epp's
`--explain-headers`), then exits, or stays up with `--keep` for your own curl.
"""

from __future__ import annotations

import time

import httpx

from epp.stack import Stack, StackOptions

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SYSTEM = (
    "You are a support assistant for an online bookshop. Answer briefly and politely. "
    "Always check the order number format (BK- followed by six digits) before anything else. "
) * 4


def _requests() -> list[tuple[str, str, dict | bytes]]:
    chat = "/v1/chat/completions"
    return [
        ("chat, shared system prompt (1st)", chat,
         {"model": MODEL, "max_tokens": 8, "messages": [
             {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is order BK-000123?"}]}),
        ("chat, shared system prompt (2nd)", chat,
         {"model": MODEL, "max_tokens": 8, "messages": [
             {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Can I return a book?"}]}),
        ("completion, another prompt", "/v1/completions",
         {"model": MODEL, "max_tokens": 8, "prompt": "Translate to French: " + "the cat sat on the mat. " * 20}),
        ("chat, streamed", chat,
         {"model": MODEL, "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True},
          "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Opening hours?"}]}),
        ("GET /v1/models", "/v1/models", b""),
        ("malformed JSON", "/v1/completions", b'{"model": "x", "prompt": '),
    ]


def _why(explain: str) -> str:
    """The pick's line of the explain header, shortened."""
    return explain.split("; ")[0] if explain else ""


def run_demo(keep: bool = False, base_port: int = 18000, layout: str = "ext-proc") -> int:
    opts = StackOptions(servers=3, epp_args=["--explain-headers", "--seed", "7"], base_port=base_port,
                        layout=layout)
    print(f"starting 3 simulated vLLM servers, epp and Envoy ({layout} layout) on loopback ...", flush=True)
    with Stack(opts) as stack:
        print(f"gateway: {stack.url}   epp metrics: {stack.metrics_url}\n")
        names = {f"127.0.0.1:{p}": f"pod-{i}" for i, p in enumerate(stack.sim_ports)}
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            for label, path, body in _requests():
                started = time.perf_counter()
                if path == "/v1/models":
                    r = client.get(path)
                elif isinstance(body, bytes):
                    r = client.post(path, content=body, headers={"content-type": "application/json"})
                else:
                    r = client.post(path, json=body)
                ms = (time.perf_counter() - started) * 1000
                pod = names.get(r.headers.get("x-epp-endpoint", ""), "-")
                print(f"{label:34} {r.status_code}  {pod:6} {ms:6.1f} ms")
                if r.status_code == 200:
                    why = _why(r.headers.get("x-epp-explain", ""))
                    for addr, name in names.items():
                        why = why.replace(addr, name)
                    print(f"{'':34} why: {why}")
                    if body and isinstance(body, dict) and body.get("stream"):
                        chunks = [ln for ln in r.text.splitlines() if ln.startswith("data: {")]
                        print(f"{'':34} streamed {len(chunks)} SSE events through the gateway")
                else:
                    print(f"{'':34} error: {r.text[:110]}")
        served = httpx.get(stack.metrics_url).text
        total = [ln for ln in served.splitlines() if ln.startswith("inference_objective_request_total{")]
        print("\nepp metrics:", *total, sep="\n  ")
        if keep:
            print(f"\nup; try:  curl {stack.url}/v1/completions -H 'content-type: application/json' "
                  f"-d '{{\"model\":\"{MODEL}\",\"prompt\":\"hello\",\"max_tokens\":5}}'   (Ctrl-C stops)")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    print("\ndemo finished: all processes stopped.")
    return 0
