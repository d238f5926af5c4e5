"""Converting coturn's turnserver.conf into turnd's TOML."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from turnserver import config as cfg
from turnserver.config import Config, load_config
from turnserver.config import load_and_check
from turnserver.coturn_conf import DEFAULT_SECRETS_PATH, parse_coturn
from turnserver.coturn_conf import convert as _convert

# What `turnd check` may say of a converted file on this machine and nowhere else: the files it
# names do not exist here, and the addresses are another host's.
_ENVIRONMENTAL = ("cannot read", "is not an address of this host", "holds no")


def convert(text: str, **kwargs: object) -> tuple[str, list[str]]:
    """The converter, with its output put through `turnd check`'s checks every time: every
    input in these tests yields a file that check accepts, apart from this machine."""
    toml_text, notes = _convert(text, **kwargs)  # type: ignore[arg-type]
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "converted.toml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(toml_text)
        _, problems = load_and_check(path, env={})
    structural = [p for p in problems if not any(m in p.message for m in _ENVIRONMENTAL)]
    assert structural == [], (structural, toml_text)
    return toml_text, notes

CONF = Path(__file__).resolve().parents[1] / "data" / "coturn" / "turnserver.conf"
SECRET = "9f8e7d6c5b4a39281706f5e4d3c2b1a0s3cr3t"
CLI_PASSWORD = "Adm1nPassw0rd!"


@pytest.fixture(autouse=True)
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", str(tmp_path / "no-default.toml"))


def load(tmp_path: Path, toml_text: str) -> Config:
    path = tmp_path / "converted.toml"
    path.write_text(toml_text, encoding="utf-8")
    return load_config(str(path), env={})  # raises ConfigError on any problem


def notes_about(notes: list[str], key: str) -> list[str]:
    return [n for n in notes
            if f": {key}:" in n or f": {key}=" in n or n.startswith(f"{key}:")]


# -- the realistic production file ----------------------------------------------------------------

def test_production_file_converts_and_loads_cleanly(tmp_path: Path) -> None:
    toml_text, notes = convert(CONF.read_text(encoding="utf-8"))
    config = load(tmp_path, toml_text)
    assert config.listen_udp == ("10.0.0.5:3478", "[2001:db8:10::5]:3478")
    assert config.listen_tcp == ("10.0.0.5:3478", "[2001:db8:10::5]:3478")
    assert config.listen_tls == ("10.0.0.5:443", "[2001:db8:10::5]:443")
    assert config.relay_addresses == ("10.0.0.5",)
    assert config.external_addresses == ("203.0.113.7=10.0.0.5",)
    assert (config.relay_port_min, config.relay_port_max) == (40000, 49999)
    assert config.realm == "turn.example.com"
    assert config.public_host == "turn.example.com"
    assert config.secrets_file == DEFAULT_SECRETS_PATH
    assert config.tls_cert_file == "/etc/turnd/tls/fullchain.pem"  # where the certbot hook copies
    assert config.tls_key_file == "/etc/turnd/tls/privkey.pem"
    assert config.max_allocations == 1200
    assert config.user_quota == 12
    assert config.allocation_bandwidth_bytes_s == 3000000  # max-bps: bytes/s per session
    assert config.max_lifetime_s == 1800
    assert config.default_lifetime_s == 600
    assert config.nonce_lifetime_s == 300
    assert config.allowed_peers == ("10.0.0.20/32",)
    assert config.denied_peers[:8] == ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10",
                                       "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
                                       "198.18.0.0/15", "fc00::/7")
    # 192.0.2.10-192.0.2.20 is no single CIDR: it becomes exactly the blocks covering it.
    assert config.denied_peers[8:] == ("192.0.2.10/31", "192.0.2.12/30", "192.0.2.16/30",
                                       "192.0.2.20/32")
    assert config.metrics_listen == "0.0.0.0:9641"
    assert config.software == ""
    assert config.log_level == "info"


def test_production_file_secrets_never_appear(tmp_path: Path) -> None:
    text = CONF.read_text(encoding="utf-8")
    assert SECRET in text and CLI_PASSWORD in text  # the fixture really has them
    toml_text, notes = convert(text)
    everything = toml_text + "\n".join(notes)
    assert SECRET not in everything
    assert CLI_PASSWORD not in everything
    secret_notes = notes_about(notes, "static-auth-secret")
    assert len(secret_notes) == 1
    assert DEFAULT_SECRETS_PATH in secret_notes[0] and "line(s) 19" in secret_notes[0]


def test_production_file_notes_for_what_is_not_carried_over() -> None:
    _, notes = convert(CONF.read_text(encoding="utf-8"))
    for key in ("alt-listening-port", "channel-lifetime", "permission-lifetime",
                "cipher-list", "dh-file", "log-file", "simple-log", "pidfile", "proc-user",
                "proc-group", "cli-password", "mobility", "prometheus"):
        assert len(notes_about(notes, key)) == 1, key
    # Options that are turnd's behaviour anyway produce no note.
    for key in ("fingerprint", "no-tlsv1", "no-multicast-peers", "no-loopback-peers",
                "no-cli", "no-dtls", "rest-api-separator", "lt-cred-mech"):
        assert notes_about(notes, key) == [], key
    assert all(n.startswith("line ") or ":" in n for n in notes)


def test_output_is_valid_toml_with_only_known_keys() -> None:
    toml_text, _ = convert(CONF.read_text(encoding="utf-8"))
    data = tomllib.loads(toml_text)
    assert set(data) <= set(cfg.OPTIONS_BY_NAME)


# -- the syntax --------------------------------------------------------------------------------

def test_parse_coturn_forms() -> None:
    lines = parse_coturn("# comment\n\n  realm=a.example\nlistening-port 3479\n"
                         "--min-port=50000\nfingerprint\npidfile=\"/run/t.pid\"\n"
                         "max-port = 60000\n")
    assert [(ln.number, ln.key, ln.value) for ln in lines] == [
        (3, "realm", "a.example"), (4, "listening-port", "3479"), (5, "min-port", "50000"),
        (6, "fingerprint", None), (7, "pidfile", "/run/t.pid"), (8, "max-port", "60000")]


def test_defaults_of_an_empty_file(tmp_path: Path) -> None:
    toml_text, notes = convert("")
    config = load(tmp_path, toml_text)
    assert config.listen_udp == ("0.0.0.0:3478", "[::]:3478")
    assert config.listen_tcp == ("0.0.0.0:3478", "[::]:3478")
    assert config.listen_tls == ()  # coturn serves TLS only with a certificate
    assert any("listen_tls is left empty" in n for n in notes)


def test_listening_port_and_no_transport_flags(tmp_path: Path) -> None:
    config = load(tmp_path, convert("listening-port=3479\nno-tcp\ncert=/c.pem\npkey=/k.pem\n"
                                    "tls-listening-port=5350\nlistening-ip=127.0.0.1\n")[0])
    assert config.listen_udp == ("127.0.0.1:3479",)
    assert config.listen_tcp == ()
    assert config.listen_tls == ("127.0.0.1:5350",)
    config = load(tmp_path, convert("no-udp\nno-tls=1\nno-tcp=false\n")[0])
    assert config.listen_udp == ()
    assert config.listen_tls == ()
    assert config.listen_tcp == ("0.0.0.0:3478", "[::]:3478")  # "=false" leaves it on


def test_external_ip_forms(tmp_path: Path) -> None:
    config = load(tmp_path, convert("external-ip=198.51.100.4\n")[0])
    assert config.external_addresses == ("198.51.100.4",)
    toml_text, notes = convert("external-ip=198.51.100.4/10.1.1.1\n"
                               "external-ip=198.51.100.5/10.1.1.2\nexternal-ip=turn.example\n")
    config = load(tmp_path, toml_text)
    assert config.external_addresses == ("198.51.100.4=10.1.1.1", "198.51.100.5=10.1.1.2")
    assert len(notes_about(notes, "external-ip")) == 1


def test_peer_ranges(tmp_path: Path) -> None:
    toml_text, notes = convert("denied-peer-ip=83.166.64.0-83.166.95.255\n"
                               "allowed-peer-ip=83.166.68.45\n"
                               "denied-peer-ip=10.0.0.0/8\n"
                               "denied-peer-ip=10.0.0.9-10.0.0.1\n"
                               "denied-peer-ip=10.0.0.1-::1\n"
                               "allowed-peer-ip=2001:db8::1\n")
    config = load(tmp_path, toml_text)
    assert config.denied_peers == ("83.166.64.0/19", "10.0.0.0/8")
    assert config.allowed_peers == ("83.166.68.45/32", "2001:db8::1/128")
    assert len(notes_about(notes, "denied-peer-ip")) == 2


def test_allow_loopback_peers_warns(tmp_path: Path) -> None:
    toml_text, notes = convert("allow-loopback-peers\n")
    assert load(tmp_path, toml_text).allowed_peers == ("127.0.0.0/8", "::1/128")
    assert "WARNING" in notes_about(notes, "allow-loopback-peers")[0]


def test_short_max_allocate_lifetime_lowers_the_default(tmp_path: Path) -> None:
    config = load(tmp_path, convert("max-allocate-lifetime=300\n")[0])
    assert (config.default_lifetime_s, config.max_lifetime_s) == (300, 300)
    assert cfg.check_config(config) == []


def test_stale_nonce_bare_and_valued(tmp_path: Path) -> None:
    assert load(tmp_path, convert("stale-nonce\n")[0]).nonce_lifetime_s == 600
    assert load(tmp_path, convert("stale-nonce=120\n")[0]).nonce_lifetime_s == 120


def test_verbose_levels(tmp_path: Path) -> None:
    assert load(tmp_path, convert("verbose\n")[0]).log_level == "info"
    assert load(tmp_path, convert("Verbose\n")[0]).log_level == "debug"


def test_prometheus_port(tmp_path: Path) -> None:
    assert load(tmp_path, convert("prometheus\nprometheus-port=9100\n")[0]).metrics_listen == \
        "0.0.0.0:9100"
    assert load(tmp_path, convert("")[0]).metrics_listen == "127.0.0.1:9641"


def test_alternate_server(tmp_path: Path) -> None:
    toml_text, notes = convert("alternate-server=198.51.100.9\n"
                               "alternate-server=[2001:db8::9]:3479\n")
    assert load(tmp_path, toml_text).alternate_server == "198.51.100.9:3478"
    assert len(notes_about(notes, "alternate-server")) == 2
    assert "only the first is carried over" in notes_about(notes, "alternate-server")[1]
    toml_text, _ = convert("alternate-server=[2001:db8::9]:3479\n")
    assert load(tmp_path, toml_text).alternate_server == "[2001:db8::9]:3479"


# Every integer option: its bounds, and where a good value lands.
_TLS = "cert=/c.pem\npkey=/k.pem\n"
INTEGER_OPTIONS = [
    ("listening-port", 1, 65535, "", 3479, lambda c: c.listen_udp[0], "0.0.0.0:3479"),
    ("tls-listening-port", 1, 65535, _TLS, 5350, lambda c: c.listen_tls[0], "0.0.0.0:5350"),
    ("min-port", 1, 65535, "", 50000, lambda c: c.relay_port_min, 50000),
    ("max-port", 1, 65535, "", 60000, lambda c: c.relay_port_max, 60000),
    ("total-quota", 0, 2**31 - 1, "", 10, lambda c: c.max_allocations, 10),
    ("user-quota", 0, 2**31 - 1, "", 5, lambda c: c.user_quota, 5),
    ("max-allocate-lifetime", 1, 2**31 - 1, "", 7200, lambda c: c.max_lifetime_s, 7200),
    ("prometheus-port", 1, 65535, "prometheus\n", 9100, lambda c: c.metrics_listen,
     "0.0.0.0:9100"),
]


@pytest.mark.parametrize("key,low,high,prefix,good,read,expected", INTEGER_OPTIONS)
def test_integer_options_within_their_bounds(tmp_path: Path, key: str, low: int, high: int,
                                            prefix: str, good: int, read, expected) -> None:
    assert read(load(tmp_path, convert(f"{prefix}{key}={good}\n")[0])) == expected
    default = read(load(tmp_path, convert(prefix)[0]))
    line = prefix.count("\n") + 1
    for bad in (low - 1, high + 1):
        toml_text, notes = convert(f"{prefix}{key}={bad}\n")
        assert notes_about(notes, key) == [f"line {line}: {key}={bad}: outside {low}-{high}; "
                                           "not carried over"]
        assert read(load(tmp_path, toml_text)) == default
    _, notes = convert(f"{prefix}{key}\n")
    assert notes_about(notes, key) == [f"line {line}: {key}: needs a value; ignored"]


def test_static_users_are_pointed_at_not_copied(tmp_path: Path) -> None:
    toml_text, notes = convert("lt-cred-mech\nuser=alice:wonderland\n"
                               "user=bob:0xbc807ee29df3c9ffa736523fb2c4e8ee\nuserdb=/var/db/turndb\n")
    assert load(tmp_path, toml_text).static_users_file == "/etc/turnd/users"
    everything = toml_text + "\n".join(notes)
    assert "wonderland" not in everything and "bc807ee2" not in everything
    assert "2 static user(s)" in notes_about(notes, "user")[0]
    assert len(notes_about(notes, "userdb")) == 1


def test_sensitive_values_never_in_notes() -> None:
    text = ("psql-userdb=host=db dbname=turn user=turn password=dbpass123\n"
            "pkey-pwd=keypass456\ncli-password=clipass789\nstatic-auth-secret=sec000\n"
            "some-future-secret-option=unknownval\n")
    toml_text, notes = convert(text)
    everything = toml_text + "\n".join(notes)
    for secret in ("dbpass123", "keypass456", "clipass789", "sec000", "unknownval"):
        assert secret not in everything


def test_use_auth_secret_without_a_static_secret(tmp_path: Path) -> None:
    toml_text, notes = convert("use-auth-secret\n")
    assert load(tmp_path, toml_text).secrets_file == DEFAULT_SECRETS_PATH
    assert "database" in notes_about(notes, "use-auth-secret")[0]


def test_unknown_options_each_get_a_note() -> None:
    _, notes = convert("frobnicate=1\nquux\nno-tls\nno-tcp-relay\n")
    assert [n for n in notes if not n.startswith(("user-quota", "total-quota", "max-bps"))] == [
        "line 1: frobnicate: unknown coturn option; not carried over",
        "line 2: quux: unknown coturn option; not carried over"]


def test_bad_numbers_are_noted_not_carried(tmp_path: Path) -> None:
    toml_text, notes = convert("min-port=lots\nmax-port=70000\nuser-quota=-1\nrealm\n")
    config = load(tmp_path, toml_text)
    assert (config.relay_port_min, config.relay_port_max) == (49152, 65535)
    assert config.user_quota == Config().user_quota  # -1 is not carried: the default stays
    # four bad lines, no TLS without a cert, coturn's unlimited total-quota and max-bps
    assert len(notes) == 7, notes
    assert any("needs a value" in n for n in notes_about(notes, "realm"))


def test_relative_cert_paths(tmp_path: Path) -> None:
    toml_text, notes = convert("cert=certs/turn.pem\npkey=certs/turn.key\n",
                               base_dir="/etc/coturn")
    config = load(tmp_path, toml_text)
    assert config.tls_cert_file == "/etc/coturn/certs/turn.pem"
    assert config.tls_key_file == "/etc/coturn/certs/turn.key"
    _, notes = convert("cert=turn.pem\npkey=/k.pem\n")
    assert any("relative" in n for n in notes)


def test_cert_without_pkey_is_noted(tmp_path: Path) -> None:
    toml_text, notes = convert("cert=/etc/ssl/turn.pem\n")
    config = load(tmp_path, toml_text)
    # Half a TLS configuration is one that check refuses: neither file, TLS off, a note.
    assert config.tls_cert_file is None and config.tls_key_file is None
    assert config.listen_tls == ()
    assert any("turn_server_pkey.pem" in n and "listen_tls" in n for n in notes)


# -- what the converter used to get wrong ---------------------------------------------------------


def test_two_relay_addresses_with_one_external_ip_become_ext_equals_bound(tmp_path: Path) -> None:
    toml_text, notes = convert("relay-ip=10.0.0.5\nrelay-ip=10.0.0.6\nexternal-ip=198.51.100.7\n")
    data = tomllib.loads(toml_text)
    assert data["external_addresses"] == ["198.51.100.7=10.0.0.5"]
    assert any("EXT=BOUND" in n for n in notes_about(notes, "external-ip"))
    single, _ = convert("relay-ip=10.0.0.5\nexternal-ip=198.51.100.7\n")
    assert tomllib.loads(single)["external_addresses"] == ["198.51.100.7"]


def test_a_letsencrypt_certificate_gets_a_note_about_the_deploy_hook() -> None:
    toml_text, notes = convert("cert=/etc/letsencrypt/live/turn.example.com/fullchain.pem\n"
                       "pkey=/etc/letsencrypt/live/turn.example.com/privkey.pem\n")
    hook = [n for n in notes if "/etc/letsencrypt" in n and "deploy hook" in n]
    assert len(hook) == 1 and "/etc/turnd/tls" in hook[0]
    data = tomllib.loads(toml_text)
    assert (data["tls_cert_file"], data["tls_key_file"]) == ("/etc/turnd/tls/fullchain.pem",
                                                             "/etc/turnd/tls/privkey.pem")
    _, elsewhere = convert("cert=/etc/turnd/tls/fullchain.pem\npkey=/etc/turnd/tls/privkey.pem\n")
    assert not any("deploy hook" in n for n in elsewhere)


def test_stun_only_is_explained_truthfully() -> None:
    _, notes = convert("stun-only\n")
    (note,) = [n for n in notes if n.startswith("stun-only")]
    assert "no STUN-only mode" in note and "generates a secret" in note
    assert "leave credentials unset" not in note


def test_no_tcp_relay_turns_tcp_allocations_off_and_its_absence_keeps_them(tmp_path: Path) -> None:
    toml_text, notes = convert("realm=example.org\n")
    assert load(tmp_path, toml_text).tcp_relay is True  # both offer RFC 6062 by default
    assert not any("RFC 6062" in n for n in notes)
    toml_text, notes = convert("realm=example.org\nno-tcp-relay\n")
    assert load(tmp_path, toml_text).tcp_relay is False
    assert not notes_about(notes, "no-tcp-relay")


def test_coturn_limits_left_at_unlimited_are_noted_with_turnds_defaults() -> None:
    _, notes = convert("realm=example.org\n")
    quota = [n for n in notes if n.startswith("user-quota")]
    assert len(quota) == 1 and "32" in quota[0] and "user part" in quota[0]
    _, set_notes = convert("realm=example.org\nuser-quota=12\ntotal-quota=100\nmax-bps=0\n")
    assert not any(n.startswith(("user-quota", "total-quota", "max-bps")) for n in set_notes)
