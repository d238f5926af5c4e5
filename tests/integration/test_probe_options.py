"""``turnd probe`` as an operator uses it on their own server: from its configuration file,
against their own CA with the certificate's name, asking for IPv6 relay addresses, and with a
``user_quota`` of 1."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path
from typing import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .server import RunningServer, bind_outside_relay_range
from .test_probe import ports_args, probe


def own_ca(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for ``name``: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "turnd test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def test_probe_reads_secrets_ports_and_host_from_the_servers_configuration(
        server_factory: Callable[..., RunningServer], tmp_path: Path) -> None:
    # Fixed ports, as in production: pick free ones, then hand probe only --config.
    ports = []
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with bind_outside_relay_range(kind) as sock:  # a listener there is a config error
            ports.append(sock.getsockname()[1])
    server = server_factory(listen_udp=[f"127.0.0.1:{ports[0]}"], listen_tcp=[f"127.0.0.1:{ports[1]}"],
                            public_host="127.0.0.1")
    result = probe("--config", str(server.config_path), "--transports", "udp,tcp", secret=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"udp  127.0.0.1:{ports[0]}  PASS" in result.stdout
    assert f"tcp  127.0.0.1:{ports[1]}  PASS" in result.stdout


def test_probe_verifies_against_ones_own_ca_and_the_certificates_name(
        server_factory: Callable[..., RunningServer], tmp_path: Path) -> None:
    ca, cert, key = own_ca(tmp_path, "turn.internal.test")
    server = server_factory(listen_tls=["127.0.0.1:0"], tls_cert_file=str(cert), tls_key_file=str(key))
    args = ["127.0.0.1", *ports_args(server), "--transports", "tls", "--timeout", "3"]
    ok = probe(*args, "--ca-file", str(ca), "--server-name", "turn.internal.test")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and "ALPN stun.turn" in ok.stdout
    wrong_name = probe(*args, "--ca-file", str(ca), "--server-name", "turn.example.com")
    assert wrong_name.returncode == 1 and "certificate verify failed" in wrong_name.stdout
    assert "--server-name names the certificate's name" in wrong_name.stdout
    by_address = probe(*args, "--ca-file", str(ca))  # HOST 127.0.0.1 is not the name
    assert by_address.returncode == 1 and "--server-name" in by_address.stdout
    system_cas = probe(*args, "--server-name", "turn.internal.test")
    assert system_cas.returncode == 1 and "certificate verify failed" in system_cas.stdout
    assert "--ca-file trusts your own CA" in system_cas.stdout


def test_probe_asks_for_ipv6_relay_addresses_when_told(server_factory: Callable[..., RunningServer]) -> None:
    dual = server_factory(relay_addresses=["127.0.0.1", "::1"])
    result = probe("127.0.0.1", *ports_args(dual), "--transports", "udp", "--families", "ipv4,ipv6",
                   "--timeout", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(ipv6 relay)  PASS" in result.stdout and "relayed [::1]:" in result.stdout
    assert result.stdout.splitlines()[-1] == "2 of 2 checks passed"
    v4_only = server_factory()
    refused = probe("127.0.0.1", *ports_args(v4_only), "--transports", "udp", "--families", "ipv6",
                    "--timeout", "3")
    assert refused.returncode == 1
    assert "440" in refused.stdout and "no relay address of this family" in refused.stdout


def test_probe_passes_with_a_user_quota_of_one(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(user_quota=1)
    result = probe("127.0.0.1", *ports_args(server), "--transports", "udp", "--timeout", "3")
    assert result.returncode == 0, result.stdout + result.stderr


def test_probe_without_host_or_public_host_is_a_usage_error() -> None:
    result = probe("--transports", "udp")
    assert result.returncode == 2 and "public_host" in result.stderr


@pytest.mark.parametrize("families", ["ipv5", ","])
def test_probe_refuses_unknown_families(families: str) -> None:
    result = probe("127.0.0.1", "--families", families)
    assert result.returncode == 2 and "--families" in result.stderr
