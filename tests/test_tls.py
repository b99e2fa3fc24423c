"""TLS on the ext_proc port (epp.tls): real gRPC servers and clients, real handshakes, a real Envoy.

Certificates are made per test with `cryptography`: a CA per "issuer", leaf pairs it signs, laid
out as a Kubernetes Secret volume mounts them (`..data` symlink swapped on rotation) or as plain
files rewritten in place.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from epp import tls
from epp.envoy import EnvoyOptions, EnvoyProcess
from epp.stack import Stack, StackOptions, free_ports, grpc_serving, wait_until
from tests.tls_helpers import LAYOUTS, Issuer, PlainFiles, SecretVolume, VerifyingEnvoy, handshake

ECHO = "/epp.test.Echo/Chat"


# --- a real server and real clients ------------------------------------------------------------

async def _echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for msg in requests:
        yield msg


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[grpc.ServerCredentials], Any]]:
    """Starts grpc.aio servers on loopback with the given credentials; yields their ports."""
    servers: list[grpc.aio.Server] = []

    async def start(creds: grpc.ServerCredentials) -> int:
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(_echo)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("epp.test.Echo", {"Chat": handler}),))
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        servers.append(server)
        return port

    yield start
    for s in servers:
        await s.stop(0)


def channel(port: int, trusted_pem: bytes) -> grpc.aio.Channel:
    """A client that verifies the server against `trusted_pem`, on a connection of its own."""
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=trusted_pem),
        options=[("grpc.use_local_subchannel_pool", 1)],
    )


async def roundtrip(port: int, trusted_pem: bytes, msg: bytes = b"ping") -> bytes:
    async with channel(port, trusted_pem) as ch:
        call = ch.stream_stream(ECHO)(timeout=5)
        await call.write(msg)
        got = await call.read()
        await call.done_writing()
        return got


async def served_certificate(port: int) -> x509.Certificate:
    return (await asyncio.to_thread(handshake, port))[2]


# --- the self-signed certificate ---------------------------------------------------------------

async def test_self_signed_certificate_serves_and_is_made_as_upstream(serve) -> None:
    st = tls.serving_tls(None)
    assert st.cert_path is None
    assert st.reloader is None
    assert "self-signed" in st.describe()
    port = await serve(st.credentials)
    # A client that trusts the certificate by its PEM verifies it for 127.0.0.1.
    assert await roundtrip(port, st.pair.certificate_chain) == b"ping"
    cert = await served_certificate(port)
    assert cert == st.pair.certificate()
    # Upstream's ten years and organisation "Inference Ext", for serving; RSA (any RSA suite works), 2048 bits
    # so that a restart does not wait seconds for a 4096-bit key.
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 2048
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Inference Ext"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=3650)
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", socket.gethostname()} <= set(sans.get_values_for_type(x509.DNSName))
    # Each start makes a new key.
    assert tls.self_signed(["localhost"]).private_key != st.pair.private_key


async def test_a_client_that_trusts_another_issuer_is_refused(serve) -> None:
    port = await serve(tls.serving_tls(None).credentials)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await roundtrip(port, Issuer("someone else").pem)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_alpn_h2_and_the_tls_versions_served(serve) -> None:
    port = await serve(tls.serving_tls(None, min_version="VersionTLS12").credentials)
    version, alpn, _ = await asyncio.to_thread(handshake, port)
    assert (version, alpn) == ("TLSv1.3", "h2")
    version, alpn, _ = await asyncio.to_thread(handshake, port, max_version=ssl.TLSVersion.TLSv1_2)
    assert (version, alpn) == ("TLSv1.2", "h2")
    # The floor is TLS 1.2: a client that offers at most TLS 1.1 (and would take any cipher) is turned
    # away by the server, not by its own settings (it does reach the server: the error is the server's).
    with pytest.raises(ssl.SSLError) as e:
        await asyncio.to_thread(handshake, port, min_version=ssl.TLSVersion.TLSv1, max_version=ssl.TLSVersion.TLSv1_1,
                                ciphers="ALL:@SECLEVEL=0")
    assert "NO_PROTOCOLS_AVAILABLE" not in str(e.value)


@pytest.mark.parametrize("value", [None, "", "VersionTLS12"])
def test_min_version_that_is_served(value) -> None:
    tls.check_min_version(value)


@pytest.mark.parametrize(("value", "says"), [
    ("VersionTLS13", "cannot be enforced"),
    ("VersionTLS11", "cannot be served"),
    ("VersionTLS10", "cannot be served"),
    ("TLS1.2", "not a TLS version"),
])
def test_min_version_that_cannot_be_honoured_is_refused_before_anything_is_made(value, says) -> None:
    with pytest.raises(tls.TLSConfigError, match=says) as e:
        tls.serving_tls(None, min_version=value)
    assert "--tls-min-version" in str(e.value)


# --- --cert-path ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
async def test_cert_path_pair_is_served(serve, tmp_path, layout) -> None:
    ca = Issuer("cluster CA")
    LAYOUTS[layout](tmp_path / "certs").write(ca.leaf())
    st = tls.serving_tls(str(tmp_path / "certs"))
    assert st.describe() == f"TLS with the certificate in {tmp_path / 'certs'}"
    port = await serve(st.credentials)
    assert await roundtrip(port, ca.pem) == b"ping"
    with pytest.raises(grpc.aio.AioRpcError):
        await roundtrip(port, Issuer("another CA").pem)


def _write(d: Path, crt: bytes | None, key: bytes | None) -> str:
    d.mkdir()
    if crt is not None:
        (d / "tls.crt").write_bytes(crt)
    if key is not None:
        (d / "tls.key").write_bytes(key)
    return str(d)


def _encrypted(pair: tls.KeyPair) -> bytes:
    key = serialization.load_pem_private_key(pair.private_key, None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"secret"))


@pytest.mark.parametrize(("case", "says"), [
    ("no directory", "cannot read tls.crt: No such file or directory"),
    ("no key", "cannot read tls.key: No such file or directory"),
    ("garbage certificate", "tls.crt holds no PEM certificate"),
    ("garbage key", "tls.key holds no PEM private key"),
    ("encrypted key", "tls.key is encrypted"),
    ("another key", "tls.key is not the key of the certificate in tls.crt"),
])
def test_bad_cert_path_is_a_clear_error_at_start(tmp_path, case, says) -> None:
    a, b = Issuer("ca").leaf(), Issuer("ca").leaf()
    path = {
        "no directory": lambda: str(tmp_path / "absent"),
        "no key": lambda: _write(tmp_path / "d", a.certificate_chain, None),
        "garbage certificate": lambda: _write(tmp_path / "d", b"not a certificate", a.private_key),
        "garbage key": lambda: _write(tmp_path / "d", a.certificate_chain, b"-----BEGIN PRIVATE KEY-----\nx\n"),
        "encrypted key": lambda: _write(tmp_path / "d", a.certificate_chain, _encrypted(a)),
        "another key": lambda: _write(tmp_path / "d", a.certificate_chain, b.private_key),
    }[case]()
    for reload in (False, True):
        with pytest.raises(tls.TLSConfigError, match=says) as e:
            tls.serving_tls(path, reload=reload)
        assert str(e.value).startswith(f"--cert-path {path}: ")


def test_an_expired_certificate_loads_with_a_warning(tmp_path, caplog) -> None:
    # As upstream: served (the operator may be mid-rotation), but said.
    expired = Issuer("ca").leaf(valid_days=-1)
    path = _write(tmp_path / "d", expired.certificate_chain, expired.private_key)
    tls.serving_tls(path)
    assert "is not valid now" in caplog.text


# --- --enable-cert-reload ------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
async def test_rotation_reaches_new_connections_and_keeps_open_streams(serve, tmp_path, layout) -> None:
    old_ca, new_ca = Issuer("old CA"), Issuer("new CA")
    volume = LAYOUTS[layout](tmp_path / "certs")
    old = old_ca.leaf()
    volume.write(old)
    st = tls.serving_tls(str(tmp_path / "certs"), reload=True)
    assert st.describe().endswith("reloaded when it changes")
    port = await serve(st.credentials)

    async with channel(port, old_ca.pem) as ch:
        stream = ch.stream_stream(ECHO)(timeout=30)
        await stream.write(b"before")
        assert await stream.read() == b"before"

        new = new_ca.leaf()
        volume.write(new)
        # A new connection gets the new certificate: a client trusting only the new CA connects,
        # one trusting only the old one no longer does.
        assert await roundtrip(port, new_ca.pem) == b"ping"
        assert await served_certificate(port) == new.certificate()
        with pytest.raises(grpc.aio.AioRpcError):
            await roundtrip(port, old_ca.pem)

        # The stream opened before the rotation goes on, on its connection, and ends cleanly.
        for i in range(3):
            await stream.write(b"after %d" % i)
            assert await stream.read() == b"after %d" % i
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
    assert st.reloader is not None
    assert st.reloader.reloads == 1


async def test_without_reload_a_rotated_pair_is_not_served(serve, tmp_path) -> None:
    volume = SecretVolume(tmp_path / "certs")
    first = Issuer("ca").leaf()
    volume.write(first)
    port = await serve(tls.serving_tls(str(tmp_path / "certs"), reload=False).credentials)
    volume.write(Issuer("ca2").leaf())
    assert await served_certificate(port) == first.certificate()


async def test_a_bad_rotation_keeps_the_served_certificate_until_a_good_one(serve, tmp_path, caplog) -> None:
    ca = Issuer("ca")
    d = tmp_path / "certs"
    volume = PlainFiles(d)
    first = ca.leaf()
    volume.write(first)
    st = tls.serving_tls(str(d), reload=True)
    port = await serve(st.credentials)

    # A new certificate whose key has not arrived yet, then a truncated certificate: both refused,
    # said once each however many connections come, and the first pair keeps serving.
    second = ca.leaf()
    (d / "tls.crt").write_bytes(second.certificate_chain)
    for _ in range(3):
        assert await served_certificate(port) == first.certificate()
        assert await roundtrip(port, ca.pem) == b"ping"
    (d / "tls.crt").write_bytes(second.certificate_chain[:40])
    assert await served_certificate(port) == first.certificate()
    warnings = [r.getMessage() for r in caplog.records if r.name == "epp.tls" and r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert "is not the key of the certificate" in warnings[0]
    assert "holds no PEM certificate" in warnings[1]
    # Both files removed (a volume being remounted): still serving.
    (d / "tls.crt").unlink()
    (d / "tls.key").unlink()
    assert await served_certificate(port) == first.certificate()

    volume.write(second)
    assert await served_certificate(port) == second.certificate()
    assert await roundtrip(port, ca.pem) == b"ping"
    assert st.reloader is not None
    assert st.reloader.reloads == 1


def test_reload_without_cert_path_is_said_not_silent(caplog) -> None:
    st = tls.serving_tls(None, reload=True)
    assert st.reloader is None
    assert "--enable-cert-reload has no effect without --cert-path" in caplog.text


# --- the real epp, through a real Envoy -------------------------------------------------------

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def simulators():
    stack = Stack(StackOptions(servers=2))
    stack.start_simulators()
    yield stack
    stack.stop()


def epp_serve(*flags: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "epp", "serve", "--drain-timeout=0s", *flags], stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.integration
@pytest.mark.parametrize("verify", ["self-signed, not verified", "cert-path, verified", "cert-path, wrong CA"])
def test_envoy_routes_through_epp_over_tls(simulators, tmp_path, verify) -> None:
    grpc_port, health_port, metrics_port, listen, admin = free_ports(5)
    flags = ["--endpoints", ",".join(simulators.endpoints), "--grpc-port", str(grpc_port),
             "--grpc-health-port", str(health_port), "--metrics-port", str(metrics_port), "--http-pick-port", "0",
             "--bind-address", "127.0.0.1"]
    envoy = EnvoyProcess(EnvoyOptions(listen, grpc_port, admin))  # the shipped bootstrap: TLS on by default
    if verify != "self-signed, not verified":
        ca = Issuer("epp CA")
        SecretVolume(tmp_path / "certs").write(ca.leaf())
        (tmp_path / "ca.crt").write_bytes((ca if verify == "cert-path, verified" else Issuer("other CA")).pem)
        flags += ["--cert-path", str(tmp_path / "certs")]
        envoy = VerifyingEnvoy(EnvoyOptions(listen, grpc_port, admin), str(tmp_path / "ca.crt"))
    epp = epp_serve(*flags, log=tmp_path / "epp.log")
    try:
        wait_until(lambda: epp.poll() is not None or grpc_serving(health_port), 30, "epp health")
        assert epp.poll() is None, (tmp_path / "epp.log").read_text()
        assert handshake(grpc_port)[1] == "h2"
        envoy.start()
        if verify == "cert-path, wrong CA":
            # Envoy verifies: an epp certificate from another issuer is refused, requests fail closed.
            def refused() -> bool:
                try:
                    stats = httpx.get(f"http://127.0.0.1:{admin}/stats?filter=cluster.ext_proc.ssl.fail_verify").text
                except httpx.HTTPError:
                    return False  # Envoy not up yet
                return any(ln.split(": ")[-1] not in ("0", "") for ln in stats.splitlines() if "fail_verify" in ln)

            wait_until(refused, 30, "Envoy to refuse epp's certificate")
            r = httpx.post(f"{envoy.url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=10)
            assert r.status_code == 503
            return
        envoy.wait_ready(30)  # the ext_proc cluster's gRPC health check passes over TLS
        r = httpx.post(f"{envoy.url}/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2},
                       timeout=10)
        assert r.status_code == 200, (r.text, envoy.logs())
        assert r.json()["choices"]
        stats = httpx.get(f"http://127.0.0.1:{admin}/stats?filter=cluster.ext_proc.ssl.handshake").text
        assert "cluster.ext_proc.ssl.handshake: " in stats, stats
        assert "cluster.ext_proc.ssl.handshake: 0" not in stats, stats
    finally:
        envoy.stop()
        epp.terminate()
        epp.wait(timeout=30)


@pytest.mark.parametrize(("flags", "says"), [
    (["--cert-path", "/nonexistent/certs"], "epp: --cert-path /nonexistent/certs: cannot read tls.crt"),
    (["--tls-min-version", "VersionTLS13"], "epp: --tls-min-version VersionTLS13 cannot be enforced"),
])
def test_epp_serve_refuses_tls_it_cannot_serve_at_start(tmp_path, flags, says) -> None:
    grpc_port, health_port, metrics_port = free_ports(3)
    epp = epp_serve("--endpoints", "127.0.0.1:1", "--grpc-port", str(grpc_port), "--grpc-health-port",
                    str(health_port), "--metrics-port", str(metrics_port), "--http-pick-port", "0",
                    "--bind-address", "127.0.0.1", *flags, log=tmp_path / "epp.log")
    try:
        assert epp.wait(timeout=30) == 1
    finally:
        if epp.poll() is None:
            epp.kill()
    out = (tmp_path / "epp.log").read_text()
    assert says in out, out
    assert "Traceback" not in out, out
