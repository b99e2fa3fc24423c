"""Run simulated model servers: `python -m epp.simulator --port 8001 --count 3`.

Several servers in one process listen on consecutive ports; each has its own engine.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from epp.simulator.engine import EngineConfig
from epp.simulator.kv_publisher import KVEventsConfig, parse_kv_events_config, server_config
from epp.simulator.server import SimulatedServer


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m epp.simulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="port of the first server")
    p.add_argument("--count", type=int, default=1, help="servers to run, on consecutive ports")
    p.add_argument("--ports", default="", help="comma-separated ports, one server each (overrides --port/--count)")
    p.add_argument("--name-prefix", default="sim")
    p.add_argument("--model", action="append", default=None, help="base model name(s) served")
    p.add_argument("--lora", action="append", default=[], help="LoRA adapter name(s) that can be loaded")
    d = EngineConfig()
    p.add_argument("--max-lora", type=int, default=d.max_lora, help="adapters loaded at once (vLLM --max-loras)")
    p.add_argument("--lora-load-ms", type=float, default=d.lora_load_ms, help="cost of loading an adapter")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="batch size limit")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="token budget of one step (chunked prefill)")
    p.add_argument("--num-gpu-blocks", type=int, default=d.num_gpu_blocks, help="KV-cache blocks")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV-cache block")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply every modelled duration (0: instant, for overhead measurements)")
    p.add_argument("--kv-events-endpoint", default="",
                   help="publish KV-cache events on this ZMQ endpoint (bound; the i-th server adds i to the port)")
    p.add_argument("--kv-events-config", default="",
                   help="vLLM's KV-events config, JSON: publisher, endpoint, topic, hwm; "
                        "a wildcard endpoint is bound, any other connected to (as vLLM)")
    args = p.parse_args()
    kv_events: KVEventsConfig | None = None
    if args.kv_events_config and args.kv_events_endpoint:
        p.error("give --kv-events-endpoint or --kv-events-config, not both")
    if args.kv_events_config:
        try:
            kv_events = parse_kv_events_config(args.kv_events_config)
        except ValueError as e:
            p.error(str(e))
    elif args.kv_events_endpoint:
        kv_events = KVEventsConfig(args.kv_events_endpoint)

    async def run() -> None:
        servers = []
        ports = [int(x) for x in args.ports.split(",") if x] or [args.port + i for i in range(args.count)]
        for i, port in enumerate(ports):
            cfg = EngineConfig(
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                num_gpu_blocks=args.num_gpu_blocks, block_size=args.block_size, time_scale=args.time_scale,
                max_lora=args.max_lora, lora_load_ms=args.lora_load_ms, lora_adapters=list(args.lora),
            )
            if args.model:
                cfg.models = list(args.model)
            events = None
            if kv_events is not None:
                events = server_config(kv_events, i)
            s = SimulatedServer(f"{args.name_prefix}-{i}", port, cfg, args.host, events)
            await s.start()
            servers.append(s)
        print(f"simulators ready on {args.host}: {', '.join(map(str, ports))}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for s in servers:
            await s.stop()

    asyncio.run(run())


if __name__ == "__main__":
    main()
