"""Certificates and TLS clients for the TLS and image tests: CAs per "issuer", leaf pairs laid out as
a Kubernetes Secret volume mounts them (`..data` symlink swapped on rotation) or as plain files,
a bare handshake, and an Envoy that verifies epp's certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from epp import tls
from epp.envoy import EnvoyOptions, EnvoyProcess, render

# --- certificates -------------------------------------------------------------------------------

class Issuer:
    """A CA that signs leaf pairs for localhost and 127.0.0.1."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=3)).not_valid_after(now + datetime.timedelta(days=3))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def leaf(self, *, valid_days: float = 1, client: bool = False) -> tls.KeyPair:
        """A serving pair (or, with `client`, a client certificate for mTLS)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "epp")]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=2))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                  else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return tls.KeyPair(
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
        )


class SecretVolume:
    """A directory as the kubelet mounts a TLS Secret: tls.crt -> ..data/tls.crt, ..data -> ..<version>;
    an update writes a new version and swaps the ..data symlink atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(exist_ok=True)

    def write(self, pair: tls.KeyPair) -> None:
        self.version += 1
        vdir = self.root / f"..v{self.version}"
        vdir.mkdir()
        (vdir / "tls.crt").write_bytes(pair.certificate_chain)
        (vdir / "tls.key").write_bytes(pair.private_key)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(vdir.name)
        os.replace(tmp, self.root / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(f"..data/{name}")


class PlainFiles:
    """tls.crt and tls.key rewritten in place (same inodes), key first, as a script copying files would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)

    def write(self, pair: tls.KeyPair) -> None:
        (self.root / "tls.key").write_bytes(pair.private_key)
        (self.root / "tls.crt").write_bytes(pair.certificate_chain)


LAYOUTS: dict[str, Callable[[Path], Any]] = {"secret-volume": SecretVolume, "plain-files": PlainFiles}


def handshake(port: int, *, max_version: ssl.TLSVersion | None = None, min_version: ssl.TLSVersion | None = None,
              ciphers: str | None = None) -> tuple[str | None, str | None, x509.Certificate]:
    """A TLS handshake from Python's ssl module, offering ALPN h2 and verifying nothing:
    (TLS version, ALPN protocol, the certificate served)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if ciphers:
        ctx.set_ciphers(ciphers)
    if min_version:
        ctx.minimum_version = min_version
    if max_version:
        ctx.maximum_version = max_version
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return s.version(), s.selected_alpn_protocol(), x509.load_der_x509_certificate(der)


def verifying(cfg: dict[str, Any], trusted_ca: str) -> dict[str, Any]:
    """The shipped bootstrap (TLS to epp, ALPN h2, epp's certificate not verified, as upstream's
    configs) made to verify epp's certificate against the CA in `trusted_ca`, for the name localhost."""
    cluster = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "ext_proc")
    common = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    common["validation_context"] = {
        "trusted_ca": {"filename": trusted_ca},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "localhost"}}],
    }
    return cfg


class VerifyingEnvoy(EnvoyProcess):
    def __init__(self, opts: EnvoyOptions, trusted_ca: str) -> None:
        super().__init__(opts)
        self.trusted_ca = trusted_ca

    def config(self) -> dict[str, Any]:
        return verifying(render(self.opts), self.trusted_ca)
