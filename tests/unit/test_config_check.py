"""check_config: the deeper checks, each problem naming its option, all reported at once."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from turnserver.config import Config, Problem, check_config

# Loopback only: binding proves nothing is sent anywhere, and 127.0.0.0/8 is always local.
LOCAL = Config(listen_udp=("127.0.0.1:3478",), listen_tcp=("127.0.0.1:3478",),
               listen_tls=("127.0.0.1:5349",), relay_addresses=("127.0.0.1",),
               metrics_listen="127.0.0.1:9641")


def check(config: Config) -> list[Problem]:
    return check_config(config)


def by_option(problems: list[Problem]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in problems:
        out.setdefault(p.option, []).append(p.message)
    return out


def with_(**changes: object) -> Config:
    return dataclasses.replace(LOCAL, **changes)  # type: ignore[arg-type]


def test_defaults_and_a_loopback_setup_are_clean() -> None:
    assert check(Config()) == []
    assert check(LOCAL) == []


# -- relay addresses and ports --------------------------------------------------------------------

def test_relay_address_that_is_not_local() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never configured here, so bind() fails; nothing is sent.
    problems = check(with_(relay_addresses=("192.0.2.1",)))
    assert len(problems) == 1
    assert problems[0].option == "relay_addresses"
    assert "192.0.2.1 is not an address of this host" in problems[0].message


@pytest.mark.parametrize("address,words", [("0.0.0.0", "one specific unicast address"),
                                           ("224.0.0.1", "one specific unicast address"),
                                           ("relay.example", "not an IP address")])
def test_relay_address_that_cannot_be_one(address: str, words: str) -> None:
    problems = check(with_(relay_addresses=(address,)))
    assert [p.option for p in problems] == ["relay_addresses"]
    assert words in problems[0].message


def test_relay_address_listed_twice() -> None:
    problems = check(with_(relay_addresses=("127.0.0.1", "127.0.0.1")))
    assert by_option(problems) == {"relay_addresses": ["127.0.0.1 is listed twice"]}


@pytest.mark.parametrize("low,high,option,words", [
    (50000, 40000, "relay_port_min", "greater than relay_port_max"),
    (50000, 50014, "relay_port_max", "holds only 15 ports"),
])
def test_relay_port_range(low: int, high: int, option: str, words: str) -> None:
    problems = check(with_(relay_port_min=low, relay_port_max=high))
    assert [p.option for p in problems] == [option]
    assert words in problems[0].message


def test_relay_port_range_of_exactly_sixteen_is_enough() -> None:
    assert check(with_(relay_port_min=50000, relay_port_max=50015)) == []


def test_relay_ports_outside_the_port_space() -> None:
    problems = check(with_(relay_port_min=0, relay_port_max=70000))
    assert by_option(problems) == {"relay_port_min": ["must be at least 1, got 0"],
                                   "relay_port_max": ["must be at most 65535, got 70000"]}


# -- listeners and port conflicts ---------------------------------------------------------------

@pytest.mark.parametrize("bad", ["::1:3478", "127.0.0.1", "localhost:3478", "127.0.0.1:99999"])
def test_listener_syntax(bad: str) -> None:
    problems = check(with_(listen_tcp=(bad,)))
    assert [p.option for p in problems] == ["listen_tcp"]
    assert repr(bad) in problems[0].message


def test_same_protocol_address_and_port_twice() -> None:
    problems = check(with_(listen_udp=("127.0.0.1:3478", "127.0.0.1:3478")))
    assert [p.option for p in problems] == ["listen_udp"]
    assert "listed twice" in problems[0].message


def test_wildcard_overlaps_a_specific_address_of_its_family_only() -> None:
    problems = check(with_(listen_udp=("0.0.0.0:3478", "127.0.0.1:3478", "[::]:3478")))
    assert [p.option for p in problems] == ["listen_udp"]
    assert "0.0.0.0:3478 and 127.0.0.1:3478 overlap" in problems[0].message


def test_tcp_and_tls_on_the_same_address_and_port() -> None:
    problems = check(with_(listen_tls=("0.0.0.0:3478",)))
    assert [p.option for p in problems] == ["listen_tls"]
    assert "conflicts with listen_tcp 127.0.0.1:3478" in problems[0].message


def test_udp_and_tcp_may_share_a_port() -> None:
    # The default layout (3478 for both) is the normal one.
    assert check(with_(listen_udp=("127.0.0.1:3478",), listen_tcp=("127.0.0.1:3478",))) == []


def test_port_zero_never_conflicts() -> None:
    config = with_(listen_udp=("127.0.0.1:0", "127.0.0.1:0"), listen_tcp=("127.0.0.1:0",),
                   listen_tls=("127.0.0.1:0",), metrics_listen="127.0.0.1:0")
    assert check(config) == []


def test_listener_port_inside_the_relay_port_range() -> None:
    problems = check(with_(listen_udp=("127.0.0.1:50000",), relay_port_min=49152))
    assert [p.option for p in problems] == ["listen_udp"]
    assert "inside the relay port range 49152-65535" in problems[0].message


def test_listener_in_the_relay_range_on_another_address_is_fine() -> None:
    config = with_(listen_udp=("127.0.0.2:50000",), relay_addresses=("127.0.0.1",))
    assert check(config) == []


def test_listener_in_the_relay_range_with_a_detected_relay_address() -> None:
    # The detected address is unknown beforehand, so any listener address could be it.
    problems = check(with_(listen_udp=("127.0.0.2:50000",), relay_addresses=()))
    assert [p.option for p in problems] == ["listen_udp"]


def test_metrics_port_equal_to_a_stream_listener() -> None:
    problems = check(with_(metrics_listen="0.0.0.0:5349"))
    assert by_option(problems) == {
        "metrics_listen": ["0.0.0.0:5349 conflicts with listen_tls 127.0.0.1:5349"]}


def test_metrics_port_equal_to_a_udp_listener_is_fine() -> None:
    assert check(with_(listen_udp=("127.0.0.1:9641",), metrics_listen="127.0.0.1:9641")) == []


def test_metrics_syntax_and_disabling() -> None:
    assert check(with_(metrics_listen="")) == []
    assert [p.option for p in check(with_(metrics_listen="9641"))] == ["metrics_listen"]


def test_no_listeners_at_all() -> None:
    problems = check(with_(listen_udp=(), listen_tcp=(), listen_tls=()))
    assert [p.option for p in problems] == ["listen_udp"]
    assert "no listeners" in problems[0].message


# -- peers -------------------------------------------------------------------------------------

def test_bad_cidrs_name_the_option_and_the_value() -> None:
    problems = check(with_(allowed_peers=("10.0.0.1/8", "127.0.0.0/8"),
                           denied_peers=("300.1.0.0/16", "fc00::/7", "banana")))
    found = by_option(problems)
    assert len(found["allowed_peers"]) == 1 and "'10.0.0.1/8'" in found["allowed_peers"][0]
    assert len(found["denied_peers"]) == 2
    assert "'300.1.0.0/16'" in found["denied_peers"][0]
    assert "'banana'" in found["denied_peers"][1]


# -- external addresses ------------------------------------------------------------------------

def test_external_addresses_good_forms() -> None:
    assert check(with_(external_addresses=("203.0.113.7",))) == []
    assert check(with_(relay_addresses=("127.0.0.1", "127.0.0.2"),
                       external_addresses=("203.0.113.7=127.0.0.1",
                                           "203.0.113.8=127.0.0.2"))) == []


@pytest.mark.parametrize("relay,external,words", [
    (("127.0.0.1",), ("turn.example",), "not an IP address"),
    (("127.0.0.1",), ("203.0.113.7=",), "not an IP address"),
    (("127.0.0.1",), ("203.0.113.7=127.0.0.9",), "not one of relay_addresses"),
    (("127.0.0.1",), ("2001:db8::1=127.0.0.1",), "different families"),
    (("127.0.0.1",), ("0.0.0.0",), "cannot be advertised"),
    (("127.0.0.1", "127.0.0.2"), ("203.0.113.7",), "needs exactly one relay address"),
    (("127.0.0.1",), ("203.0.113.7", "203.0.113.8"), "more than one bare"),
    ((), ("203.0.113.7=192.0.2.1",), "not an address of this host"),
])
def test_external_addresses_problems(relay: tuple[str, ...], external: tuple[str, ...],
                                     words: str) -> None:
    problems = check(with_(relay_addresses=relay, external_addresses=external))
    assert [p.option for p in problems] == ["external_addresses"]
    assert words in problems[0].message


# -- TLS certificate and key --------------------------------------------------------------------

def make_cert(tmp_path: Path, name: str, *, days_from: int = -1, days_to: int = 30,
              password: bytes | None = None) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "turn.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days_from))
            .not_valid_after(now + datetime.timedelta(days=days_to))
            .sign(key, hashes.SHA256()))
    cert_path = tmp_path / f"{name}.crt"
    key_path = tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8, encryption))
    return str(cert_path), str(key_path)


def test_matching_certificate_and_key(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "a")
    assert check(with_(tls_cert_file=cert, tls_key_file=key)) == []


def test_key_not_matching_the_certificate(tmp_path: Path) -> None:
    cert, _ = make_cert(tmp_path, "a")
    _, other_key = make_cert(tmp_path, "b")
    problems = check(with_(tls_cert_file=cert, tls_key_file=other_key))
    assert [p.option for p in problems] == ["tls_key_file"]
    assert "does not match the certificate" in problems[0].message


def test_certificate_without_key_and_key_without_certificate(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "a")
    assert [p.option for p in check(with_(tls_cert_file=cert))] == ["tls_key_file"]
    assert [p.option for p in check(with_(tls_key_file=key))] == ["tls_cert_file"]


def test_unreadable_and_garbage_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN NOTHING-----\nxx\n")
    problems = check(with_(tls_cert_file=str(garbage), tls_key_file=str(tmp_path / "none")))
    found = by_option(problems)
    assert "holds no PEM certificate" in found["tls_cert_file"][0]
    assert "cannot read" in found["tls_key_file"][0]
    problems = check(with_(tls_cert_file=str(tmp_path / "none"), tls_key_file=str(garbage)))
    found = by_option(problems)
    assert "cannot read" in found["tls_cert_file"][0]
    assert "no usable PEM private key" in found["tls_key_file"][0]


def test_encrypted_key(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "a", password=b"pass-phrase")
    problems = check(with_(tls_cert_file=cert, tls_key_file=key))
    assert [p.option for p in problems] == ["tls_key_file"]
    assert "encrypted" in problems[0].message


def test_expired_and_not_yet_valid_certificates_are_warnings_not_problems(tmp_path: Path) -> None:
    # An expired certificate must not stop UDP and TCP, nor block an unrelated reload.
    from turnserver.config import config_warnings

    def private(cert_key: tuple[str, str]) -> tuple[str, str]:
        Path(cert_key[1]).chmod(0o600)  # a key every user can read is warned about as well
        return cert_key

    cert, key = private(make_cert(tmp_path, "old", days_from=-30, days_to=-1))
    config = with_(tls_cert_file=cert, tls_key_file=key)
    assert check(config) == []
    warnings = config_warnings(config)
    assert [p.option for p in warnings] == ["tls_cert_file"] and "expired" in warnings[0].message
    cert, key = private(make_cert(tmp_path, "new", days_from=2, days_to=30))
    assert check(with_(tls_cert_file=cert, tls_key_file=key)) == []
    assert "not valid until" in config_warnings(with_(tls_cert_file=cert, tls_key_file=key))[0].message
    cert, key = private(make_cert(tmp_path, "soon", days_from=-30, days_to=5))
    assert "expires on" in config_warnings(with_(tls_cert_file=cert, tls_key_file=key))[0].message
    cert, key = private(make_cert(tmp_path, "fine", days_from=-1, days_to=90))
    assert config_warnings(with_(tls_cert_file=cert, tls_key_file=key)) == []


def test_files_with_secrets_that_every_user_can_read_are_warned_about(tmp_path: Path) -> None:
    from turnserver.config import config_warnings

    secrets = tmp_path / "secrets"
    secrets.write_text("a" * 64 + "\n")
    users = tmp_path / "users"
    users.write_text("alice:password\n")
    secrets.chmod(0o644)
    users.chmod(0o640)
    warnings = config_warnings(with_(secrets_file=str(secrets), static_users_file=str(users)))
    assert [p.option for p in warnings] == ["secrets_file"]
    assert "0644" in warnings[0].message and "a" * 64 not in warnings[0].message
    secrets.chmod(0o600)
    assert config_warnings(with_(secrets_file=str(secrets), static_users_file=str(users))) == []


def test_every_problem_is_reported_in_one_pass(tmp_path: Path) -> None:
    # A type error no longer hides the deeper checks: bad CIDRs and unreadable certificates
    # come out in the same run.
    from turnserver.config import load_and_check

    path = tmp_path / "turnd.toml"
    path.write_text('relay_port_min = "lots"\nallowed_peers = ["10.0.0.0/33"]\n'
                    f'tls_cert_file = "{tmp_path / "missing.pem"}"\n'
                    f'tls_key_file = "{tmp_path / "missing.key"}"\n'
                    'listen_udp = ["127.0.0.1:3478"]\nlisten_tcp = []\nlisten_tls = []\n'
                    'relay_addresses = ["127.0.0.1"]\n')
    _, problems = load_and_check(str(path), env={})
    options = {p.option for p in problems}
    assert {"relay_port_min", "allowed_peers", "tls_cert_file", "tls_key_file"} <= options, problems
    # The environment too: two bad variables, both reported.
    _, problems = load_and_check(None, env={"TURND_RELAY_PORT_MIN": "abc",
                                            "TURND_LISTEN_UDP": "nonsense:99999",
                                            "TURND_LISTEN_TCP": "", "TURND_LISTEN_TLS": "",
                                            "TURND_RELAY_ADDRESSES": "127.0.0.1"})
    assert {"relay_port_min", "listen_udp"} <= {p.option for p in problems}, problems


def test_a_bad_value_from_a_flag_does_not_leave_the_files_value_in_force(tmp_path: Path) -> None:
    from turnserver.config import load_and_check

    path = tmp_path / "turnd.toml"
    path.write_text("relay_port_min = 40000\n")
    config, problems = load_and_check(str(path), env={}, overrides={"relay_port_min": "abc"})
    assert [p.option for p in problems][:1] == ["relay_port_min"]
    assert config.relay_port_min == Config().relay_port_min


# -- secrets and static users -------------------------------------------------------------------

def test_secrets_file_unreadable_or_empty(tmp_path: Path) -> None:
    problems = check(with_(secrets_file=str(tmp_path / "missing")))
    assert [p.option for p in problems] == ["secrets_file"]
    assert "cannot read" in problems[0].message
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    # An empty file is a revocation, not a mistake: a warning, so that a reload applies it.
    from turnserver.config import config_warnings

    assert check(with_(secrets_file=str(empty))) == []
    empty.chmod(0o600)
    warnings = config_warnings(with_(secrets_file=str(empty)))
    assert [p.option for p in warnings] == ["secrets_file"]
    assert "holds no secrets" in warnings[0].message and "revoked" in warnings[0].message


def test_secrets_file_with_secrets_is_fine(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text("s3cr3t-value\n")
    problems = check(with_(secrets_file=str(secrets)))
    assert problems == []


def test_static_users_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:wonderland-pass\n"
                     "bob:0x" + "ab" * 16 + "\n"
                     "# a comment\n"
                     "carol-without-colon-and-secret-xyz\n"
                     "dave:0xnothex\n"
                     "alice:again-pass\n")
    problems = check(with_(static_users_file=str(users)))
    messages = [p.message for p in problems]
    assert all(p.option == "static_users_file" for p in problems)
    assert len(problems) == 3
    assert "line 4" in messages[0] and "line 5" in messages[1] and "line 6" in messages[2]
    # The user is named where the line has one; the password never is.
    assert "user 'dave'" in messages[1] and "user 'alice'" in messages[2]
    text = "\n".join(messages)
    for secret_part in ("wonderland", "secret-xyz", "nothex", "again-pass"):
        assert secret_part not in text


def test_static_users_file_good(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:pass\nbob:0x" + "0f" * 16 + "\n")
    assert check(with_(static_users_file=str(users))) == []


# -- the rest -----------------------------------------------------------------------------------

def test_default_lifetime_above_max_lifetime() -> None:
    problems = check(with_(default_lifetime_s=7200, max_lifetime_s=3600))
    assert [p.option for p in problems] == ["default_lifetime_s"]


@pytest.mark.parametrize("value,words", [("203.0.113.9", "is not a valid"),
                                         ("0.0.0.0:3478", "specific address"),
                                         ("203.0.113.9:0", "non-zero port")])
def test_alternate_server(value: str, words: str) -> None:
    problems = check(with_(alternate_server=value))
    assert [p.option for p in problems] == ["alternate_server"]
    assert words in problems[0].message


def test_alternate_server_good() -> None:
    assert check(with_(alternate_server="[2001:db8::7]:3478")) == []


def test_rfc8489_text_limits_and_public_host() -> None:
    problems = check(with_(realm="r" * 128, software="s" * 128, public_host="not a host!"))
    assert [p.option for p in problems] == ["realm", "software", "public_host"]
    assert check(with_(realm="r" * 127, software="", public_host="turn.example.com")) == []
    assert check(with_(public_host="2001:db8::1")) == []


def test_a_hand_built_config_with_wrong_types() -> None:
    config = with_(max_connections="2", listen_udp=["127.0.0.1:3478"], log_level="loud",
                   realm=None)
    found = by_option(check(config))
    assert set(found) == {"max_connections", "listen_udp", "log_level", "realm"}


def test_several_problems_at_once(tmp_path: Path) -> None:
    config = with_(relay_addresses=("192.0.2.1",), allowed_peers=("10.0.0.300/8",),
                   relay_port_min=60000, relay_port_max=60001,
                   tls_cert_file=str(tmp_path / "missing.pem"),
                   listen_tls=("127.0.0.1:3478",), default_lifetime_s=4000,
                   secrets_file=str(tmp_path / "nosecrets"))
    options = {p.option for p in check(config)}
    assert options == {"relay_addresses", "allowed_peers", "relay_port_max", "tls_cert_file",
                       "tls_key_file", "listen_tls", "default_lifetime_s", "secrets_file"}


def test_a_listener_on_an_address_this_host_does_not_have_is_a_problem() -> None:
    # serve could not bind it, and a systemd unit would restart forever; check says so first.
    problems = check(with_(listen_udp=("192.0.2.123:3478",), listen_tcp=("192.0.2.123:3478",)))
    assert [p.option for p in problems] == ["listen_udp", "listen_tcp"]
    assert all("not an address of this host" in p.message for p in problems)
    assert check(with_(listen_udp=("127.0.0.1:3478",), listen_tcp=("0.0.0.0:3478",))) == []
