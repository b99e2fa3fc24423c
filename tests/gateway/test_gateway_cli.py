"""The sub-commands as users run them: `epp gateway --no-envoy` with an Envoy of one's own, and `epp bbr`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from gateway_harness import EXAMPLES, wait_for

from epp.envoy import envoy_binary
from epp.stack import free_ports
from tests.extproc_messages import BUFFERED, body_msg, headers_msg, set_headers

pytestmark = pytest.mark.integration


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    running: list[subprocess.Popen[bytes]] = []
    yield running
    for p in reversed(running):
        p.terminate()
    for p in running:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def test_print_bootstrap_names_the_given_ports() -> None:
    out = subprocess.run([sys.executable, "-m", "epp.gateway", "gateway", "--manifests", "unused", "--print-bootstrap",
                          "--xds-port", "18555", "--envoy-admin-port", "19555"], capture_output=True, check=True).stdout
    cfg = yaml.safe_load(out)
    assert cfg["admin"]["address"]["socket_address"]["port_value"] == 19555
    (xds,) = cfg["static_resources"]["clusters"]
    assert xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1", "port_value": 18555}
    assert cfg["dynamic_resources"]["ads_config"]["grpc_services"] == [{"envoy_grpc": {"cluster_name": "epp-xds"}}]


def test_gateway_without_envoy_serves_an_envoy_started_from_its_bootstrap(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    listen, admin, envoy_admin, xds = free_ports(4)
    # The mirroring example, its pods on addresses of their own (the rollout tests' simulators use the others).
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for f in (EXAMPLES / "mirroring").iterdir():
        (manifests / f.name).write_text(f.read_text().replace("127.0.14.", "127.0.15."))
    procs.append(spawn([sys.executable, "-m", "epp.gateway.simulators", "--time-scale", "0.1", "--manifests",
                        str(manifests)], tmp_path / "sims.log"))
    gateway = spawn([sys.executable, "-m", "epp.gateway", "gateway", "--manifests", str(manifests), "--no-envoy",
                     "--address", "127.0.0.1", "--port-map", f"80={listen}", "--xds-port", str(xds),
                     "--admin-port", str(admin)], tmp_path / "gateway.log")
    procs.append(gateway)
    boot = subprocess.run([sys.executable, "-m", "epp.gateway", "gateway", "--manifests", str(manifests),
                           "--print-bootstrap", "--xds-port", str(xds), "--envoy-admin-port", str(envoy_admin)],
                          capture_output=True, check=True).stdout
    (tmp_path / "envoy.yaml").write_bytes(boot)
    procs.append(spawn([envoy_binary(), "-c", str(tmp_path / "envoy.yaml"), "--base-id", str(envoy_admin),
                        "--disable-hot-restart", "--concurrency", "1"], tmp_path / "envoy.log"))

    def served() -> bool:
        assert gateway.poll() is None, (tmp_path / "gateway.log").read_text()
        try:
            r = httpx.post(f"http://127.0.0.1:{listen}/v1/completions", timeout=2,
                           json={"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "hi", "max_tokens": 2})
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.headers["x-simulator-pod"].startswith("chat-")
    wait_for(served, 60, f"a request through the Envoy started by hand\n{(tmp_path / 'gateway.log').read_text()}",
             interval=0.1)
    st = httpx.get(f"http://127.0.0.1:{admin}/status").json()
    assert st["envoy"]["connected"] == 1


def test_bbr_alone_sets_the_headers_and_rereads_its_mapping(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    grpc_port, health_port = free_ports(2)
    mapping = tmp_path / "mapping"
    mapping.mkdir()
    cm = (EXAMPLES / "multi-model" / "base-models.yaml").read_text()
    (mapping / "base-models.yaml").write_text(cm)
    proc = spawn([sys.executable, "-m", "epp.gateway", "bbr", "--grpc-port", str(grpc_port), "--grpc-health-port",
                  str(health_port), "--bind-address", "127.0.0.1", "--secure-serving=false", "--mapping", str(mapping)],
                 tmp_path / "bbr.log")
    procs.append(proc)

    def base_of(model: str) -> str | None:
        assert proc.poll() is None, (tmp_path / "bbr.log").read_text()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
                answers = list(pbg.ExternalProcessorStub(ch).Process(
                    iter([headers_msg(mode=BUFFERED), body_msg(f'{{"model": "{model}"}}'.encode())]), timeout=2))
        except grpc.RpcError:
            return None
        return set_headers(answers[1].request_body.response)["x-gateway-base-model-name"]

    assert wait_for(lambda: base_of("chatbot"), 30, "epp bbr") == "google/gemma-3-27b-it"
    (mapping / "base-models.yaml").write_text(cm.replace("google/gemma-3-27b-it", "google/gemma-3-4b-it"))
    wait_for(lambda: base_of("chatbot") == "google/gemma-3-4b-it", 10, "the edited mapping")
