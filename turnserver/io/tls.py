"""TLS for the ``turns:`` listeners: the server SSLContext, its certificate, reloads.

RFC 8656 §3.1 carries TURN over TLS-over-TCP; RFC 7443 names the ALPN protocol
"stun.turn". Choices made here:

* TLS 1.2 at least; for 1.2 only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305
  (TLS 1.3 suites are all AEAD already). Renegotiation and compression are off.
* ALPN "stun.turn" is offered but never required: browsers send no ALPN for TURN, and a
  client offering something else still gets through (OpenSSL answers without ALPN then).
* SNI is accepted whatever the name: one certificate serves every name the operator
  pointed at this host, and refusing an unknown name would only break clients.
* With no certificate configured a self-signed one (EC P-256) is made in memory at start-up,
  naming the relay addresses, loopback, "localhost" and the host name. That is enough for
  tests and for clients that pin or ignore the certificate, not for browsers.

A reload builds a complete new context and swaps it in only when it loaded without error:
new handshakes use it, established connections keep the session they have, and a bad file
leaves the old certificate serving.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("turnd")

# RFC 7443 §4: the ALPN protocol id of TURN.
ALPN_STUN_TURN = "stun.turn"
# TLS 1.2 suites allowed; TLS 1.3 suites are not affected by set_ciphers.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
SELF_SIGNED_LIFETIME = datetime.timedelta(days=365)


class TlsError(OSError):
    """A certificate or key could not be loaded; the message names the file, never its content.

    An OSError, like a port that cannot be bound: start-up reports it and exits.
    """


@dataclass(frozen=True)
class CertificateInfo:
    """What is known about the certificate a context serves (for logs and metrics)."""

    not_after: float  # Unix time the leaf certificate expires
    subject: str
    self_signed: bool
    source: str  # the certificate file, or "self-signed"


def new_server_context() -> ssl.SSLContext:
    """A server context with the protocol settings above and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # A client-initiated renegotiation costs the server a handshake per request: refuse it.
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols([ALPN_STUN_TURN])
    return ctx


def load_context(cert_file: str, key_file: str) -> tuple[ssl.SSLContext, CertificateInfo]:
    """Read the PEM chain and key once and build a context from those bytes.

    Reading once (rather than letting OpenSSL open the paths) means the check of the
    certificate and the context are made from the same bytes even when a renewal tool
    replaces the files meanwhile.
    """
    try:
        with open(cert_file, "rb") as handle:
            cert_pem = handle.read()
        with open(key_file, "rb") as handle:
            key_pem = handle.read()
    except OSError as exc:
        raise TlsError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    return context_from_pem(cert_pem, key_pem, source=cert_file)


def context_from_pem(cert_pem: bytes, key_pem: bytes, *, source: str,
                     self_signed: bool = False) -> tuple[ssl.SSLContext, CertificateInfo]:
    from cryptography import x509

    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        chain = []
    if not chain:
        raise TlsError(f"{source} holds no PEM certificate")
    leaf = chain[0]
    info = CertificateInfo(
        not_after=leaf.not_valid_after_utc.timestamp(),
        subject=leaf.subject.rfc4514_string(),
        self_signed=self_signed,
        source=source,
    )
    ctx = new_server_context()
    # The ssl module only loads from paths: stage the bytes in a directory only we can read
    # and remove it at once; the context keeps the key in memory.
    tmpdir = tempfile.mkdtemp(prefix="turnd-tls-")
    try:
        cert_path = os.path.join(tmpdir, "cert.pem")
        key_path = os.path.join(tmpdir, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            # The reason only (e.g. KEY_VALUES_MISMATCH), never the key material.
            raise TlsError(f"cannot use the certificate/key of {source}: "
                           f"{exc.reason or exc.strerror or 'invalid'}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ctx, info


def self_signed_names(relay_addresses: list[str], extra_names: list[str] | None = None) -> list[str]:
    """Names for the subjectAltName of the start-up certificate, without duplicates."""
    names = [*relay_addresses, "127.0.0.1", "::1", "localhost", socket.gethostname(),
             *(extra_names or [])]
    seen: list[str] = []
    for name in names:
        if name and name not in seen:
            seen.append(name)
    return seen


def certificate_names(config: Config, relay_addresses: list[str]) -> list[str]:
    """Names a self-signed certificate should carry for this configuration."""
    extra = [item.split("=", 1)[0].strip() for item in config.external_addresses]
    if config.public_host:
        extra.append(config.public_host)
    return self_signed_names(relay_addresses, extra)


def make_self_signed(names: list[str], *, now: datetime.datetime | None = None,
                     lifetime: datetime.timedelta = SELF_SIGNED_LIFETIME) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a fresh EC P-256 self-signed certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            try:
                alt.append(x509.DNSName(name))
            except ValueError:  # not a usable DNS name (odd host names): leave it out
                continue
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "turnd self-signed"),
    ])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # An hour of slack for clients whose clock is a little behind.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


class TlsCertificates:
    """The context every TLS listener hands to new handshakes, and how to replace it.

    ``context`` is read at each handshake, so swapping it (``reload``) affects new
    connections only.
    """

    def __init__(self, context: ssl.SSLContext, info: CertificateInfo) -> None:
        self.context = context
        self.info = info
        self.reloads_ok = 0
        self.reloads_failed = 0

    @classmethod
    def from_config(cls, cert_file: str | None, key_file: str | None, *,
                    names: list[str], self_signed: tuple[bytes, bytes] | None = None,
                    ) -> TlsCertificates:
        """Load the configured files, or make a self-signed certificate when none is set.

        Raises :class:`TlsError` when files are configured but unusable: at start-up a
        broken certificate must stop the server rather than silently serve a self-signed one.
        """
        if cert_file or key_file:
            if not (cert_file and key_file):
                raise TlsError("tls_cert_file and tls_key_file must be set together")
            ctx, info = load_context(cert_file, key_file)
            log.info("TLS certificate %s (%s), valid until %s", cert_file, info.subject,
                     _utc(info.not_after))
            return cls(ctx, info)
        return cls(*_self_signed_context(names, self_signed))

    @property
    def not_after(self) -> float:
        """Unix time the served certificate expires."""
        return self.info.not_after

    def reload(self, cert_file: str | None, key_file: str | None, *, names: list[str]) -> None:
        """Swap in the configured certificate; on any error keep the current one and raise.

        Raises :class:`TlsError` (file name and reason, never key material).
        """
        try:
            if cert_file or key_file:
                if not (cert_file and key_file):
                    raise TlsError("tls_cert_file and tls_key_file must be set together")
                ctx, info = load_context(cert_file, key_file)
            elif self.info.self_signed:
                # Nothing configured before or now: keep the certificate clients may have pinned.
                self.reloads_ok += 1
                return
            else:
                ctx, info = _self_signed_context(names)
        except TlsError:
            self.reloads_failed += 1
            raise
        self.context, self.info = ctx, info
        self.reloads_ok += 1
        log.info("TLS certificate reloaded from %s (%s), valid until %s", info.source,
                 info.subject, _utc(info.not_after))


def _self_signed_context(names: list[str], pem: tuple[bytes, bytes] | None = None,
                         ) -> tuple[ssl.SSLContext, CertificateInfo]:
    """A self-signed certificate for ``names``; ``pem``: one already made (worker processes
    serve their parent's, so every worker shows clients the same certificate)."""
    cert_pem, key_pem = pem if pem is not None else make_self_signed(names)
    ctx, info = context_from_pem(cert_pem, key_pem, source="self-signed", self_signed=True)
    log.warning("no tls_cert_file configured: serving a self-signed certificate for %s; "
                "browsers will refuse it", ", ".join(names))
    return ctx, info


def _utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
