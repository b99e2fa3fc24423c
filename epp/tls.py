"""TLS on the ext_proc gRPC port, served as the Go EPP serves it.

The Go EPP (GIE and llm-d-router) serves ext_proc over TLS by default (`--secure-serving`), with the
pair `tls.crt` / `tls.key` in `--cert-path`, else with a self-signed certificate made at start.
With `--enable-cert-reload` a rotated pair is used for new connections; connections already open
keep the session they negotiated, so no stream is dropped. gRPC offers ALPN h2 itself.

gRPC's Python API has no setting for TLS versions: its TLS stack (gRPC core's) serves TLS 1.2 and
1.3, always. So `--tls-min-version VersionTLS12` is honoured as it stands, and every other value is
refused here with the reason, rather than accepted and not enforced.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
# Upstream's names (Go's crypto/tls constants), as `--tls-min-version` takes them.
TLS_VERSIONS = ("VersionTLS10", "VersionTLS11", "VersionTLS12", "VersionTLS13")
# What gRPC core serves, whatever it is asked: its floor is TLS 1.2, its ceiling TLS 1.3.
SERVED_MIN_VERSION = "VersionTLS12"
# The self-signed certificate, as upstream makes it (ten years, organisation "Inference Ext"), but with an
# RSA 2048 key: upstream's 4096-bit key takes 0.3 to over 2 s to generate, all of it downtime on a restart;
# an operator who wants a stronger key mounts a certificate (`--cert-path`).
SELF_SIGNED_KEY_BITS = 2048
SELF_SIGNED_VALIDITY = datetime.timedelta(days=3650)
SELF_SIGNED_ORGANIZATION = "Inference Ext"


class TLSConfigError(ValueError):
    """A TLS setting epp cannot serve; the message names the setting and what to do instead."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate chain and its private key, both PEM, as gRPC takes them."""

    certificate_chain: bytes
    private_key: bytes

    def certificate(self) -> x509.Certificate:
        """The leaf: the first certificate of the chain."""
        return x509.load_pem_x509_certificate(self.certificate_chain)

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.private_key, self.certificate_chain)])


def check_min_version(value: str | None) -> None:
    """Refuse a `--tls-min-version` epp cannot enforce; None or "" means gRPC's floor, TLS 1.2."""
    if not value or value == SERVED_MIN_VERSION:
        return
    if value not in TLS_VERSIONS:
        raise TLSConfigError(f"--tls-min-version {value!r} is not a TLS version; known: {', '.join(TLS_VERSIONS)}")
    if value == "VersionTLS13":
        raise TLSConfigError(
            "--tls-min-version VersionTLS13 cannot be enforced: gRPC's Python API has no setting for the TLS "
            "version, and gRPC serves TLS 1.2 and 1.3; use VersionTLS12 (what is served) or leave the flag out"
        )
    raise TLSConfigError(
        f"--tls-min-version {value} cannot be served: gRPC never accepts TLS below 1.2, so clients limited to "
        f"{value.removeprefix('Version')} could not connect; use VersionTLS12 or leave the flag out"
    )


def default_hostnames() -> list[str]:
    """The names the self-signed certificate is for: localhost and this host's (in Kubernetes, the pod's) name."""
    names = ["localhost"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return names


def self_signed(hostnames: Sequence[str] | None = None) -> KeyPair:
    """A fresh self-signed serving certificate, as upstream makes one at start (plus SANs, so a client
    that verifies can trust it by its PEM and name it by `localhost`, the host name, or a loopback IP).

    Generating the RSA key takes a fraction of a second: call it once, at start-up.
    """
    names = list(hostnames) if hostnames is not None else default_hostnames()
    key = rsa.generate_private_key(public_exponent=65537, key_size=SELF_SIGNED_KEY_BITS)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, SELF_SIGNED_ORGANIZATION)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ip_address("127.0.0.1")), x509.IPAddress(ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(
        certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
        private_key=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
    )


def read_pair(cert_path: str) -> KeyPair:
    """`tls.crt` and `tls.key` from the directory, checked: PEM, an unencrypted key, and the key the
    certificate is for (gRPC itself would only fail at the first handshake, with no reason given)."""
    return check_pair(cert_path, *_read_files(cert_path))


def _read_files(cert_path: str) -> tuple[bytes, bytes]:
    out = []
    for name in (CERT_FILE, KEY_FILE):
        try:
            with open(os.path.join(cert_path, name), "rb") as f:
                out.append(f.read())
        except OSError as e:
            raise TLSConfigError(f"--cert-path {cert_path}: cannot read {name}: {e.strerror}") from None
    return out[0], out[1]


def check_pair(cert_path: str, cert_pem: bytes, key_pem: bytes) -> KeyPair:
    """The pair, once it is known to load; `cert_path` only names it in errors."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSConfigError(f"--cert-path {cert_path}: {CERT_FILE} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TLSConfigError(f"--cert-path {cert_path}: {KEY_FILE} is encrypted; give an unencrypted key") from None
    except ValueError:
        raise TLSConfigError(f"--cert-path {cert_path}: {KEY_FILE} holds no PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise TLSConfigError(f"--cert-path {cert_path}: {KEY_FILE} is not the key of the certificate in {CERT_FILE}")
    now = datetime.datetime.now(datetime.UTC)
    if not chain[0].not_valid_before_utc <= now <= chain[0].not_valid_after_utc:
        log.warning("the certificate in %s is not valid now (valid %s to %s); clients that verify will refuse it",
                    os.path.join(cert_path, CERT_FILE), chain[0].not_valid_before_utc, chain[0].not_valid_after_utc)
    return KeyPair(certificate_chain=cert_pem, private_key=key_pem)


# File times tick coarsely (a kernel tick): a file changed this recently may change again unseen by
# stat alone, so its content is compared too.
_SETTLE_NS = 2_000_000_000


def _file_state(cert_path: str) -> tuple[tuple[int, int, int, int], ...] | None:
    """What identifies the two files' current versions, following symlinks (a Kubernetes Secret
    volume swaps a `..data` symlink); None while either is missing."""
    try:
        return tuple(
            (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
            for st in (os.stat(os.path.join(cert_path, n)) for n in (CERT_FILE, KEY_FILE))
        )
    except OSError:
        return None


class ReloadingPair:
    """gRPC's certificate-configuration fetcher for `--enable-cert-reload`.

    gRPC calls it before each new connection's handshake: it costs two stat calls while the files
    are unchanged (and reads them while they changed in the last two seconds). A changed pair is
    checked first; one that does not load (half-written; key and certificate not matching yet)
    leaves the current certificate serving, with one warning per content, and is tried again when
    the files change again.
    """

    def __init__(self, cert_path: str, current: KeyPair) -> None:
        self.cert_path = cert_path
        self.current = current
        self.reloads = 0
        self._state = _file_state(cert_path)
        self._refused: tuple[bytes, bytes] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        state = _file_state(self.cert_path)
        if state is None:
            return None
        with self._lock:
            settled = all(time.time_ns() - s[2] > _SETTLE_NS for s in state)
            if state == self._state and settled:
                return None
            self._state = state
            try:
                files = _read_files(self.cert_path)
            except TLSConfigError:
                return None  # mid-swap: seen again with the next connection
            if files == (self.current.certificate_chain, self.current.private_key) or files == self._refused:
                return None
            try:
                pair = check_pair(self.cert_path, *files)
            except TLSConfigError as e:
                log.warning("keeping the certificate being served: %s", e)
                self._refused = files
                return None
            self.current = pair
            self.reloads += 1
        log.info("serving the rotated certificate from %s to new connections", self.cert_path)
        return pair.grpc_configuration()


@dataclass(frozen=True)
class ServingTLS:
    """What the ext_proc port serves: the credentials for `add_secure_port`, and what they hold."""

    credentials: grpc.ServerCredentials
    pair: KeyPair  # the pair served at start (a rotated one is in `reloader.current`)
    cert_path: str | None  # None: self-signed
    reloader: ReloadingPair | None

    def describe(self) -> str:
        """For the start-up log line."""
        if self.cert_path is None:
            return "TLS with a self-signed certificate"
        return f"TLS with the certificate in {self.cert_path}" + (", reloaded when it changes" if self.reloader else "")


def serving_tls(cert_path: str | None, *, reload: bool = False, min_version: str | None = None,
                hostnames: Sequence[str] | None = None) -> ServingTLS:
    """The TLS that `--cert-path`, `--enable-cert-reload` and `--tls-min-version` ask for.

    Raises TLSConfigError, before anything is bound, for a setting that cannot be served or a pair
    that does not load. `reload` without `cert_path` changes nothing, as upstream (a self-signed
    certificate lives as long as the process); it is logged.
    """
    check_min_version(min_version)
    if not cert_path:
        if reload:
            log.warning("--enable-cert-reload has no effect without --cert-path: the self-signed certificate "
                        "is made once, at start")
        pair = self_signed(hostnames)
        return ServingTLS(grpc.ssl_server_credentials([(pair.private_key, pair.certificate_chain)]), pair, None, None)
    pair = read_pair(cert_path)
    if not reload:
        return ServingTLS(grpc.ssl_server_credentials([(pair.private_key, pair.certificate_chain)]),
                          pair, cert_path, None)
    reloader = ReloadingPair(cert_path, pair)
    creds = grpc.dynamic_ssl_server_credentials(pair.grpc_configuration(), reloader)
    return ServingTLS(creds, pair, cert_path, reloader)


def server_credentials(cert_path: str | None, *, reload: bool = False,
                       min_version: str | None = None) -> grpc.ServerCredentials:
    """Only the credentials of `serving_tls`."""
    return serving_tls(cert_path, reload=reload, min_version=min_version).credentials
