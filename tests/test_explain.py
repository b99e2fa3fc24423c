"""The explain API over real gRPC, the `epp explain` CLI, and the generated modules being current."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import orjson
import pytest

from epp import cli, explain
from epp.datastore import EndpointMetrics
from epp.server import EppServer
from epp.stack import free_ports
from tests.helpers import StartEpp

ROOT = Path(__file__).resolve().parent.parent
# A profile that weighs the scraped queue and KV use (GIE's weights), so set_load decides the pick.
LOAD_PROFILE = (ROOT / "bench" / "configs" / "gie-weights.yaml").read_text()


@pytest.fixture
async def epp(start_epp: StartEpp) -> EppServer:
    """This module's epp weighs the scraped load, and knows one sheddable objective ("batch").

    It serves TLS with its self-signed certificate, as `epp serve` does by default: explain's client
    speaks TLS too."""
    server = await start_epp(config_text=LOAD_PROFILE, secure_serving=True, explain_port=free_ports(1)[0])
    # This module sets each endpoint's metrics itself (set_load); a scrape of the absent servers
    # would forget them (a refused connection means a server is down).
    server.scraper.stop()
    server.datastore.objectives = {"batch": -1}
    server.addr = f"127.0.0.1:{server.opts.explain_port}"  # type: ignore[attr-defined]
    return server


def set_load(server: EppServer, *loads: tuple[int, float, tuple[str, ...]]) -> None:
    for ep, (waiting, kv, adapters) in zip(server.datastore.all_endpoints(), loads, strict=True):
        ep.metrics = EndpointMetrics(waiting=waiting, kv_usage=kv, active_adapters=frozenset(adapters), max_lora=2,
                                     scraped_at=time.monotonic() + 60)  # fresh for the whole test


def body(model: str = "m", prompt: str = "why is the sky blue") -> bytes:
    return orjson.dumps({"model": model, "prompt": prompt})


async def ask(server: EppServer, data: bytes, **kw):
    return await asyncio.to_thread(explain.query, server.addr, data, **kw)


async def test_explain_shows_every_score_and_the_pick_without_sending(epp: EppServer) -> None:
    set_load(epp, (8, 0.7, ()), (0, 0.1, ("m",)), (3, 0.4, ()))
    resp = await ask(epp, body())
    eps = epp.datastore.all_endpoints()
    assert resp.targets == [eps[1].hostport]
    assert [c.address for c in resp.candidates] == [eps[1].hostport, eps[2].hostport, eps[0].hostport]
    pick = resp.candidates[0]
    assert pick.rank == 0
    assert pick.passed_filters
    assert set(pick.scores) == {s.name for s in resp.scorers} == {
        "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "lora-affinity-scorer",
        "running-requests-scorer", "prefill-load-scorer"}
    assert pick.scores["lora-affinity-scorer"] == 1.0
    weights = {s.name: s.weight for s in resp.scorers}
    assert pick.total == pytest.approx(sum(weights[n] * v for n, v in pick.scores.items()))
    assert pick.metrics.fresh
    assert pick.metrics.waiting == 0
    # Nothing was sent: no in-flight count, and the prefix index did not learn the prompt.
    assert all(ep.inflight == 0 for ep in eps)
    again = await ask(epp, body())
    assert again.candidates[0].scores["prefix-cache-scorer"] == 0.0


async def test_explain_reports_rejections(epp: EppServer) -> None:
    bad = await ask(epp, b"{not json")
    assert bad.error.http_status == 400
    assert bad.error.reason == "invalid_json"
    set_load(epp, (9, 0.9, ()), (7, 0.5, ()), (5, 0.1, ()))  # every queue at the threshold: saturated
    shed = await ask(epp, body(), headers={"x-gateway-inference-objective": "batch"})
    assert shed.priority == -1
    assert shed.pool_saturated
    assert shed.error.http_status == 429
    assert not shed.targets
    assert all(c.passed_filters for c in shed.candidates)  # still scored, to show why
    ok = await ask(epp, body())
    assert ok.pool_saturated
    assert not ok.HasField("error")
    assert len(ok.targets) == 1
    nowhere = await ask(epp, body(), subset=["10.9.9.9:80"])
    assert nowhere.error.http_status == 503


async def test_cli_prints_the_table(epp: EppServer, capsys: pytest.CaptureFixture[str]) -> None:
    set_load(epp, (2, 0.2, ()), (0, 0.1, ()), (1, 0.4, ()))
    argv = ["explain", "--server", epp.addr, "-H", "x-gateway-inference-objective: batch", body().decode()]
    rc = await asyncio.to_thread(cli.main, argv)
    out = capsys.readouterr().out
    assert rc == 0
    assert "priority: -1" in out
    pick_line = next(line for line in out.splitlines() if line.startswith("pick "))
    assert epp.datastore.all_endpoints()[1].hostport in pick_line
    rc = await asyncio.to_thread(cli.main, ["explain", "--server", epp.addr, "{oops"])
    assert rc == 1
    assert "rejected: 400 invalid_json" in capsys.readouterr().out


def test_cli_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_ports(1)[0]
    rc = cli.main(["explain", "--server", f"127.0.0.1:{port}", "--timeout", "1s", "{}"])
    assert rc == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


async def test_explain_is_not_served_on_the_ext_proc_port(start_epp: StartEpp) -> None:
    """It tells any caller whether a prompt's prefix is cached somewhere, and every pod's load: only on
    127.0.0.1, on its own port, never on the port the gateway (and whoever reaches it) talks to."""
    server = await start_epp(explain_port=free_ports(1)[0])
    with pytest.raises(grpc.RpcError) as e:
        await asyncio.to_thread(explain.query, f"127.0.0.1:{server.opts.grpc_port}", body())
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    ok = await asyncio.to_thread(explain.query, f"127.0.0.1:{server.opts.explain_port}", body())
    assert len(ok.candidates) == 3


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    """protos/generate was run after the last edit of protos/ (a stale module would serve an old API)."""
    proto = "epp/_proto/explain.proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"), f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", str(ROOT / "protos" / proto)],
        check=True,
    )
    for name in ("explain_pb2.py", "explain_pb2_grpc.py", "explain_pb2.pyi"):
        fresh, kept = ((d / "epp/_proto" / name).read_text() for d in (tmp_path, ROOT))
        assert _without_versions(fresh) == _without_versions(kept), name


def _without_versions(module: str) -> str:
    """The generator's version stamps change with every grpcio-tools or protobuf release; the code does not."""
    module = re.sub(r"ValidateProtobufRuntimeVersion\([^)]*\)", "ValidateProtobufRuntimeVersion()", module)
    return re.sub(r"(GRPC_GENERATED_VERSION = |Protobuf Python Version: )[^\n]*", r"\1", module)
