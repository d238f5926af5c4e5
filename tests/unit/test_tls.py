"""turnserver/io/tls.py: the server context's protocol choices, the self-signed start-up
certificate, loading and reloading certificate files."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from turnserver.config import Config
from turnserver.io.tls import (
    TlsCertificates,
    TlsError,
    certificate_names,
    context_from_pem,
    load_context,
    make_self_signed,
    new_server_context,
    self_signed_names,
)

NOW = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


def write_pair(directory: Path, name: str, names: list[str] | None = None) -> tuple[str, str, x509.Certificate]:
    cert_pem, key_pem = make_self_signed(names or ["127.0.0.1", "localhost"])
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return str(cert_path), str(key_path), x509.load_pem_x509_certificate(cert_pem)


def test_context_requires_tls12_and_offers_only_ecdhe_aead_suites_for_tls12() -> None:
    ctx = new_server_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12, "no TLS 1.2 suites at all"
    for cipher in tls12:
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]
        assert cipher["aead"], cipher["name"]
    names = {c["name"] for c in tls12}
    assert any("CHACHA20" in n for n in names) and any("GCM" in n for n in names)
    assert not any(n.endswith("-SHA") for n in names)  # the CBC/SHA-1 suites


def test_self_signed_certificate_is_p256_with_the_requested_names() -> None:
    names = ["192.0.2.7", "127.0.0.1", "::1", "localhost", "turn.example.net"]
    cert_pem, key_pem = make_self_signed(names, now=NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "turn.example.net"}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=365)
    assert cert.not_valid_before_utc < NOW
    assert b"PRIVATE KEY" in key_pem


def test_self_signed_names_cover_loopback_and_the_host_without_duplicates() -> None:
    names = self_signed_names(["10.0.0.5", "127.0.0.1"], ["turn.example.net", "10.0.0.5"])
    assert names[:2] == ["10.0.0.5", "127.0.0.1"]
    assert {"::1", "localhost", socket.gethostname(), "turn.example.net"} <= set(names)
    assert len(names) == len(set(names))


def test_certificate_names_add_public_host_and_external_addresses() -> None:
    config = Config(public_host="turn.example.net", external_addresses=("203.0.113.7=10.0.0.5",))
    names = certificate_names(config, ["10.0.0.5"])
    assert {"10.0.0.5", "203.0.113.7", "turn.example.net", "127.0.0.1"} <= set(names)


def test_context_from_pem_serves_the_chain_and_reports_expiry(tmp_path: Path) -> None:
    cert_path, key_path, cert = write_pair(tmp_path, "a")
    ctx, info = load_context(cert_path, key_path)
    assert info.not_after == cert.not_valid_after_utc.timestamp()
    assert info.source == cert_path and not info.self_signed
    assert isinstance(ctx, ssl.SSLContext) and ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_key_that_does_not_match_is_refused_without_showing_the_key(tmp_path: Path) -> None:
    cert_path, _, _ = write_pair(tmp_path, "a")
    _, other_key, _ = write_pair(tmp_path, "b")
    with pytest.raises(TlsError) as caught:
        load_context(cert_path, other_key)
    text = str(caught.value)
    assert cert_path in text
    assert "PRIVATE KEY" not in text and Path(other_key).read_text()[40:80] not in text


def test_unreadable_or_empty_files_are_tls_errors_and_os_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(TlsError, match="missing.pem"):
        load_context(missing, missing)
    assert issubclass(TlsError, OSError)  # start-up reports it like an unbindable port
    with pytest.raises(TlsError, match="no PEM certificate"):
        context_from_pem(b"not a certificate", b"", source="x.pem")


def test_no_key_material_is_left_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    cert_pem, key_pem = make_self_signed(["127.0.0.1"])
    context_from_pem(cert_pem, key_pem, source="memory")
    with pytest.raises(TlsError):
        context_from_pem(cert_pem, make_self_signed(["127.0.0.1"])[1], source="memory")
    assert os.listdir(staging) == []


def test_without_files_a_self_signed_certificate_is_made_and_a_warning_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="turnd"):
        certs = TlsCertificates.from_config(None, None, names=["127.0.0.1", "localhost"])
    assert certs.info.self_signed
    assert certs.not_after > datetime.datetime.now(datetime.timezone.utc).timestamp() + 300 * 86400
    assert any("self-signed" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # The context serves that certificate, for the names asked.
    served = served_certificate(certs.context)
    assert served.not_valid_after_utc.timestamp() == certs.not_after
    assert served.subject.rfc4514_string() == certs.info.subject and certs.info.source == "self-signed"
    san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def served_certificate(server_context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a TLS handshake with ``server_context`` presents (in memory, no socket)."""
    client_context = ssl.create_default_context()
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    pipes = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]
    client = client_context.wrap_bio(pipes[0][0], pipes[0][1])
    server = server_context.wrap_bio(pipes[1][0], pipes[1][1], server_side=True)
    for _ in range(10):
        done = 0
        for end in (client, server):
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        pipes[1][0].write(pipes[0][1].read())  # client -> server
        pipes[0][0].write(pipes[1][1].read())  # server -> client
        if done == 2:
            break
    der = client.getpeercert(binary_form=True)
    assert der is not None, "no handshake"
    return x509.load_der_x509_certificate(der)


def test_only_one_of_cert_and_key_is_an_error(tmp_path: Path) -> None:
    cert_path, _, _ = write_pair(tmp_path, "a")
    with pytest.raises(TlsError, match="together"):
        TlsCertificates.from_config(cert_path, None, names=[])


def test_reload_swaps_in_a_good_certificate_and_keeps_the_old_one_on_error(tmp_path: Path) -> None:
    a_cert, a_key, a = write_pair(tmp_path, "a")
    b_cert, b_key, b = write_pair(tmp_path, "b")
    certs = TlsCertificates.from_config(a_cert, a_key, names=[])
    first = certs.context
    assert certs.not_after == a.not_valid_after_utc.timestamp()
    certs.reload(b_cert, b_key, names=[])
    assert certs.context is not first and certs.info.source == b_cert
    assert certs.not_after == b.not_valid_after_utc.timestamp()
    second = certs.context
    with pytest.raises(TlsError):
        certs.reload(b_cert, a_key, names=[])  # mismatched pair
    with pytest.raises(TlsError):
        certs.reload(str(tmp_path / "gone.crt"), b_key, names=[])
    assert certs.context is second and certs.info.source == b_cert
    assert (certs.reloads_ok, certs.reloads_failed) == (1, 2)


def test_reload_without_files_keeps_the_start_up_self_signed_certificate() -> None:
    certs = TlsCertificates.from_config(None, None, names=["127.0.0.1"])
    ctx, info = certs.context, certs.info
    certs.reload(None, None, names=["127.0.0.1"])
    assert certs.context is ctx and certs.info is info

