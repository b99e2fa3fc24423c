"""Simulated model servers for every pod the manifests' InferencePools select.

`python -m epp.gateway.simulators --manifests DIR` starts one epp simulator per pod
endpoint (its `status.podIP` and each of its pool's target ports), named after the
pod, serving the models its container's vLLM arguments name: `vllm serve MODEL` or
`--model`, `--served-model-name`, and the adapters of `--lora-modules name=path` (or
its JSON form). The demo and the gateway tests use it; on Linux every 127.0.0.0/8
address is local, so pods may have addresses like 127.0.10.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from epp.gateway import manifests
from epp.yaml_lines import load_documents


@dataclass
class PodServer:
    name: str
    host: str
    port: int
    models: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    max_lora: int | None = None


def vllm_models(pod: dict[str, Any]) -> tuple[list[str], list[str], int | None]:
    """(served model names, LoRA adapter names, --max-loras) from the pod's first container."""
    containers = ((pod.get("spec") or {}).get("containers") or [{}])
    c = containers[0] if isinstance(containers[0], dict) else {}
    tokens: list[str] = []
    for part in [*(c.get("command") or []), *(c.get("args") or [])]:
        text = str(part)
        tokens.extend(shlex.split(text) if " " in text and not text.lstrip().startswith("{") else [text])
    args: list[str] = []
    for t in tokens:  # --flag=value as two tokens
        if t.startswith("--") and "=" in t:
            args.extend(t.split("=", 1))
        else:
            args.append(t)
    model, served, adapters, max_lora = None, [], [], None
    i = 0
    while i < len(args):
        a = args[i]
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("-")
        if a in ("serve", "--model") and takes_value:
            model = args[i + 1]
            i += 1
        elif a == "--served-model-name":
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                served.append(args[i + 1])
                i += 1
        elif a == "--lora-modules":
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                adapters.append(_adapter_name(args[i + 1]))
                i += 1
        elif a == "--max-loras" and i + 1 < len(args):
            max_lora = int(args[i + 1])
            i += 1
        i += 1
    models = served or ([model] if model else [])
    return models, adapters, max_lora


def _adapter_name(spec: str) -> str:
    if spec.lstrip().startswith("{"):
        return str(json.loads(spec)["name"])
    return spec.split("=", 1)[0]


def pod_servers(paths: Sequence[str], namespace: str = "default") -> list[PodServer]:
    """A server for every endpoint of every pool, each once; each path is a set of manifests of its own."""
    out: dict[tuple[str, int], PodServer] = {}
    for path in paths:
        spec = manifests.load([path], namespace)
        pods: dict[str, dict[str, Any]] = {}
        for f in manifests.manifest_files([path]):
            with open(f, encoding="utf-8") as fh:
                for doc in load_documents(fh.read(), f):
                    if isinstance(doc, dict) and doc.get("kind") == "Pod":
                        pods[str((doc.get("metadata") or {}).get("name"))] = doc
        for pool in spec.pools.values():
            for ep in pool.snapshot.endpoints:
                pod_name = ep.name.split("-rank-")[0]
                models, adapters, max_lora = vllm_models(pods.get(pod_name, {}))
                out.setdefault((ep.host, ep.port), PodServer(ep.name, ep.host, ep.port, models, adapters, max_lora))
    return list(out.values())


async def serve(servers: Sequence[PodServer], time_scale: float = 1.0) -> None:
    from epp.simulator.engine import EngineConfig
    from epp.simulator.server import SimulatedServer

    running = []
    for s in servers:
        cfg = EngineConfig(time_scale=time_scale, lora_adapters=list(s.adapters))
        if s.models:
            cfg.models = list(s.models)
        if s.max_lora is not None:
            cfg.max_lora = s.max_lora
        sim = SimulatedServer(s.name, s.port, cfg, s.host)
        await sim.start()
        running.append(sim)
    print("simulators ready: " + ", ".join(f"{s.name}={s.host}:{s.port}" for s in servers), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sim in running:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m epp.gateway.simulators")
    p.add_argument("--manifests", nargs="+", action="extend", required=True, metavar="DIR|FILE")
    p.add_argument("--namespace", default="default")
    p.add_argument("--time-scale", type=float, default=1.0, help="the simulators' --time-scale")
    args = p.parse_args(argv)
    asyncio.run(serve(pod_servers(args.manifests, args.namespace), args.time_scale))


if __name__ == "__main__":
    main()
