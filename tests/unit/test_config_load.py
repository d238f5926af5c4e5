"""Loading the configuration: TOML, TURND_* environment, CLI overrides, precedence, problems."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from turnserver import config as cfg
from turnserver.config import (
    OPTIONS,
    OPTIONS_BY_NAME,
    Config,
    ConfigError,
    Problem,
    click_options,
    load_config,
    load_secrets,
    overrides_from_click,
    parse_hostport,
    reload_plan,
)


@pytest.fixture(autouse=True)
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Whatever /etc/turnd/turnd.toml holds on this machine must not leak into the tests.
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", str(tmp_path / "no-default.toml"))


def write(tmp_path: Path, text: str, name: str = "turnd.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in excinfo.value.problems:
        out.setdefault(p.option, []).append(p.message)
    return out


# -- the registry and Config agree ---------------------------------------------------------------

def test_every_option_is_a_config_field_with_the_same_default_and_order() -> None:
    fields = dataclasses.fields(Config)
    assert [f.name for f in fields] == [o.name for o in OPTIONS]
    for f, o in zip(fields, OPTIONS):
        assert f.default == o.default, o.name


def test_registry_spellings_and_reload_classes() -> None:
    port_min = OPTIONS_BY_NAME["relay_port_min"]
    assert port_min.env == "TURND_RELAY_PORT_MIN"
    assert port_min.cli_flag == "--relay-port-min"
    restart_only = {o.name for o in OPTIONS if not o.reload}
    assert restart_only == {"listen_udp", "listen_tcp", "listen_tls", "relay_addresses",
                            "external_addresses", "relay_port_min", "relay_port_max", "realm",
                            "metrics_listen", "workers", "admin_socket", "usage_log_file",
                            "usage_log_max_bytes", "usage_log_rotate_s", "usage_log_flush_s"}


# -- sources and precedence ----------------------------------------------------------------------

def test_no_path_and_no_default_file_gives_the_built_in_defaults() -> None:
    assert load_config(None, env={}) == Config()


def test_default_path_is_read_when_it_exists(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    path = write(tmp_path, "relay_port_min = 50000\n")
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", path)
    assert load_config(None, env={}).relay_port_min == 50000



def test_toml_values_of_every_type(tmp_path: Path) -> None:
    path = write(tmp_path, """
listen_udp = ["127.0.0.1:3478", "[::1]:3478"]
listen_tls = []
relay_port_min = 40000
allow_refresh_after_expiry = false
stream_idle_timeout_s = 5
log_level = "DEBUG"
tls_cert_file = "/etc/ssl/turn.pem"
public_host = "turn.example.com"
""")
    config = load_config(path, env={})
    assert config.listen_udp == ("127.0.0.1:3478", "[::1]:3478")
    assert config.listen_tls == ()
    assert config.relay_port_min == 40000
    assert config.allow_refresh_after_expiry is False
    assert config.stream_idle_timeout_s == 5.0 and isinstance(config.stream_idle_timeout_s, float)
    assert config.log_level == "debug"
    assert config.tls_cert_file == "/etc/ssl/turn.pem"
    assert config.public_host == "turn.example.com"
    assert config.listen_tcp == Config().listen_tcp  # untouched options keep their defaults


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = write(tmp_path, "relay_port_min = 41000\nrelay_port_max = 42000\nuser_quota = 3\n")
    env = {"TURND_RELAY_PORT_MAX": "43000", "TURND_USER_QUOTA": "4"}
    config = load_config(path, env=env, overrides={"user_quota": "5"})
    assert config.relay_port_min == 41000  # file only
    assert config.relay_port_max == 43000  # env beats file
    assert config.user_quota == 5  # CLI beats env and file
    assert config.max_connections == 4096  # default


def test_env_conversions() -> None:
    env = {
        "TURND_ALLOW_REFRESH_AFTER_EXPIRY": "0",
        "TURND_MAX_CONNECTIONS": " 4 ",
        "TURND_DRAIN_TIMEOUT_S": "2.5",
        "TURND_DENIED_PEERS": "10.0.0.0/8, 192.168.0.0/16\n172.16.0.0/12,",
        "TURND_TLS_KEY_FILE": "key.pem",
        "TURND_LOG_FORMAT": "JSON",
    }
    config = load_config(None, env=env)
    assert config.allow_refresh_after_expiry is False
    assert config.max_connections == 4
    assert config.drain_timeout_s == 2.5
    assert config.denied_peers == ("10.0.0.0/8", "192.168.0.0/16", "172.16.0.0/12")
    assert config.tls_key_file == "key.pem"  # env paths stay relative to the working directory
    assert config.log_format == "json"


@pytest.mark.parametrize("word,expected", [("true", True), ("YES", True), ("on", True),
                                           ("1", True), ("false", False), ("No", False),
                                           ("off", False), ("0", False)])
def test_env_booleans(tmp_path: Path, word: str, expected: bool) -> None:
    path = write(tmp_path, "")
    config = load_config(path, env={"TURND_ALLOW_REFRESH_AFTER_EXPIRY": word})
    assert config.allow_refresh_after_expiry is expected


def test_empty_string_unsets_an_optional_option_and_empties_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, 'tls_cert_file = "/x.pem"\npublic_host = "a.example"\n')
    config = load_config(path, env={"TURND_TLS_CERT_FILE": "", "TURND_LISTEN_TLS": ""},
                         overrides={"public_host": ""})
    assert config.tls_cert_file is None
    assert config.public_host is None
    assert config.listen_tls == ()


def test_empty_software_is_kept_as_empty_not_unset(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'software = ""\n'), env={})
    assert config.software == ""


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(sub, 'secrets_file = "secrets"\ntls_cert_file = "../certs/cert.pem"\n')
    config = load_config(path, env={})
    assert config.secrets_file == str(sub / "secrets")
    assert config.tls_cert_file == str(tmp_path / "certs" / "cert.pem")


def test_turnd_secrets_and_turnd_config_are_not_unknown_variables(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    config = load_config(path, env={"TURND_SECRETS": "s1", "TURND_CONFIG": path})
    assert config == Config()


def test_overrides_accept_native_values_too(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), env={},
                         overrides={"relay_addresses": ["127.0.0.1"], "max_connections": 2,
                                    "allow_refresh_after_expiry": False, "metrics_listen": None})
    assert config.relay_addresses == ("127.0.0.1",)
    assert config.max_connections == 2
    assert config.allow_refresh_after_expiry is False
    assert config.metrics_listen == "127.0.0.1:9641"  # None means "not given"


# -- problems --------------------------------------------------------------------------------------

def test_every_problem_is_reported_at_once_each_naming_its_option(tmp_path: Path) -> None:
    path = write(tmp_path, """
relay_port_min = "50000"
relay_prot_max = 60000
log_level = "loud"
max_connections = 0
listen_udp = "0.0.0.0:3478"
allow_refresh_after_expiry = 1
stream_idle_timeout_s = true
""")
    env = {"TURND_USER_QUOTA": "many", "TURND_RELAY_PORTS": "1-2"}
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env=env, overrides={"max_lifetime_s": "-1", "bogus": 1})
    found = problems_of(excinfo)
    assert set(found) == {"relay_port_min", "relay_prot_max", "log_level", "max_connections",
                          "listen_udp", "allow_refresh_after_expiry", "stream_idle_timeout_s",
                          "user_quota", "TURND_RELAY_PORTS", "max_lifetime_s", "bogus"}
    assert "expected an integer" in found["relay_port_min"][0]
    assert "did you mean relay_port_max" in found["relay_prot_max"][0]
    assert "debug, info, warning, error" in found["log_level"][0]
    assert "at least 1" in found["max_connections"][0]
    assert "list of strings" in found["listen_udp"][0]
    assert "true or false" in found["allow_refresh_after_expiry"][0]
    assert "expected a number" in found["stream_idle_timeout_s"][0]
    assert "from TURND_USER_QUOTA" in found["user_quota"][0]
    assert "unknown environment variable" in found["TURND_RELAY_PORTS"][0]
    assert "from --max-lifetime-s" in found["max_lifetime_s"][0]
    assert "unknown option" in found["bogus"][0]
    # str() lists every problem, one per line, "option: message".
    lines = str(excinfo.value).splitlines()
    assert len(lines) == len(excinfo.value.problems) == 11
    assert all(": " in line for line in lines)


def test_a_bad_file_value_is_reported_even_when_env_overrides_it(tmp_path: Path) -> None:
    path = write(tmp_path, "max_connections = -3\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={"TURND_MAX_CONNECTIONS": "2"})
    assert [p.option for p in excinfo.value.problems] == ["max_connections"]


def test_unknown_key_with_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "denied_peer = []\n"), env={})
    assert excinfo.value.problems == [
        Problem("denied_peer", f"unknown option; did you mean denied_peers? (in {tmp_path}/turnd.toml)")]


def test_section_tables_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "[relay]\nrelay_port_min = 40000\n"), env={})
    assert excinfo.value.problems[0].option == "relay"
    assert "top-level keys" in excinfo.value.problems[0].message


def test_a_secret_in_the_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, 'static_auth_secret = "hunter2-very-secret"\n'), env={})
    assert "hunter2" not in str(excinfo.value)
    assert "secrets_file" in str(excinfo.value)


def test_invalid_toml_and_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "relay_port_min = \n"), env={})
    assert excinfo.value.problems[0].option == "config"
    assert "not valid TOML" in excinfo.value.problems[0].message
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(tmp_path / "nope.toml"), env={})
    assert excinfo.value.problems[0].option == "config"
    assert "cannot read" in excinfo.value.problems[0].message


@pytest.mark.parametrize("text", ["max_connections = 1.5", "max_connections = true", "drain_timeout_s = nan",
                                  "relay_port_max = 70000", "listen_udp = [1]",
                                  "listen_udp = [\"\"]", "realm = 7", "realm = \"a\\u0000b\""])
def test_single_bad_values(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, text + "\n"), env={})
    assert len(excinfo.value.problems) == 1
    assert excinfo.value.problems[0].option == text.split(" ")[0]


# -- secrets -------------------------------------------------------------------------------------

def test_load_secrets_file_lines_then_env(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_bytes(b"# current first\nfirst-secret\n\n  second-secret  \n")
    config = Config(secrets_file=str(secrets))
    got = load_secrets(config, {"TURND_SECRETS": "env-one\nenv-two\nfirst-secret"})
    assert got == [b"first-secret", b"second-secret", b"env-one", b"env-two"]


@pytest.mark.parametrize("secret", ["a,b;c d", "x,y", "tab\there", "p@ss:w=rd,1"])
def test_turnd_secrets_is_never_split_inside_a_secret(secret: str) -> None:
    # Only a line break separates secrets: every other character may be part of one.
    assert load_secrets(Config(), {"TURND_SECRETS": secret}) == [secret.encode()]
    assert load_secrets(Config(), {"TURND_SECRETS": f"{secret}\r\nnext"}) == [secret.encode(), b"next"]


@pytest.mark.parametrize(("secret", "weak"), [
    (b"hunter2", True), (b"0123456789abcdef0123456789abcde", True),  # 31 hex digits: 124 bits
    (b"0123456789abcdef0123456789abcdef", False), (b"integration-test-secret", False),
    (b"short printable!", True), (bytes(range(128, 144)), False),
])
def test_weak_secret_warnings_name_the_secret_by_position_only(secret: bytes, weak: bool) -> None:
    from turnserver.config import weak_secret_warnings

    warnings = weak_secret_warnings([b"0" * 64, secret])
    assert len(warnings) == (1 if weak else 0)
    if weak:
        assert warnings[0].startswith("shared secret #2 ")
        assert secret.decode("latin-1") not in warnings[0]


def test_load_secrets_from_env_alone_and_none_at_all() -> None:
    assert load_secrets(Config(), {"TURND_SECRETS": "a"}) == [b"a"]
    assert load_secrets(Config(), {}) == []


def test_load_secrets_unreadable_names_secrets_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_secrets(Config(secrets_file=str(tmp_path / "missing")), {"TURND_SECRETS": "zzz"})
    assert [p.option for p in excinfo.value.problems] == ["secrets_file"]
    assert "zzz" not in str(excinfo.value)


def test_secrets_are_never_a_flag() -> None:
    @click.command()
    @click_options
    def cmd(**kwargs: object) -> None:
        pass

    names = {opt for p in cmd.params for opt in p.opts}
    assert "--secrets-file" in names
    assert not any("secret" in n and n != "--secrets-file" for n in names)


# -- host:port -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("0.0.0.0:3478", ("0.0.0.0", 3478)),
                                           ("[::]:3478", ("::", 3478)),
                                           ("[2001:db8::1]:5349", ("2001:db8::1", 5349)),
                                           ("127.0.0.1:0", ("127.0.0.1", 0))])
def test_parse_hostport_good(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, "listen_udp") == expected


@pytest.mark.parametrize("text", ["::1:3478", "0.0.0.0", "[::1]3478", "[127.0.0.1]:1",
                                  "host.example:3478", "1.2.3.4:70000", "1.2.3.4:-1",
                                  "[::1:3478", "1.2.3.4:port", ""])
def test_parse_hostport_bad_names_the_option(text: str) -> None:
    with pytest.raises(ValueError, match=r"^listen_tcp: "):
        parse_hostport(text, "listen_tcp")


# -- command-line flags ------------------------------------------------------------------------------

def _flag_probe() -> click.Command:
    @click.command()
    @click_options
    def cmd(**kwargs: object) -> None:
        overrides = overrides_from_click(kwargs)
        click.echo(json.dumps({"given": sorted(overrides),
                               "config": dataclasses.asdict(load_config(None, env={},
                                                                        overrides=overrides))}))

    return cmd


def test_click_options_has_one_flag_per_option() -> None:
    cmd = _flag_probe()
    names = {p.name for p in cmd.params}
    assert names == {o.name for o in OPTIONS}


def test_flags_not_given_are_not_overrides() -> None:
    result = CliRunner().invoke(_flag_probe(), [])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["given"] == []


def test_flags_given_become_overrides_and_load() -> None:
    args = ["--relay-port-min", "50000", "--no-allow-refresh-after-expiry",
            "--listen-udp", "127.0.0.1:3478", "--listen-udp", "[::1]:3478,127.0.0.2:3478",
            "--listen-tls", "", "--log-level", "warning"]
    result = CliRunner().invoke(_flag_probe(), args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["given"] == ["allow_refresh_after_expiry", "listen_tls", "listen_udp",
                            "log_level", "relay_port_min"]
    config = out["config"]
    assert config["relay_port_min"] == 50000
    assert config["allow_refresh_after_expiry"] is False
    assert config["listen_udp"] == ["127.0.0.1:3478", "[::1]:3478", "127.0.0.2:3478"]
    assert config["listen_tls"] == []
    assert config["log_level"] == "warning"


def test_overrides_from_click_ignores_other_parameters() -> None:
    assert overrides_from_click({"config_path": "x", "max_connections": "3", "listen_udp": (),
                                 "realm": None}) == {"max_connections": "3"}


# -- reload ---------------------------------------------------------------------------------------------

def test_reload_plan_splits_changes() -> None:
    old = Config()
    new = dataclasses.replace(old, user_quota=5, log_level="debug", relay_port_min=50000,
                              realm="other")
    live, restart = reload_plan(old, new)
    assert live == ["user_quota", "log_level"]
    assert restart == ["relay_port_min", "realm"]
    assert reload_plan(old, old) == ([], [])
