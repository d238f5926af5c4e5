"""`turnd check` and `turnd convert-coturn` through click's test runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from turnserver import config as cfg
from turnserver.config import load_config
from turnserver.config_commands import check, convert_coturn

CONF = Path(__file__).resolve().parents[1] / "data" / "coturn" / "turnserver.conf"
SECRET = "9f8e7d6c5b4a39281706f5e4d3c2b1a0s3cr3t"

# Loopback listeners and relay: nothing here depends on the host's real addresses.
LOOPBACK_FLAGS = ["--listen-udp", "127.0.0.1:3478", "--listen-tcp", "127.0.0.1:3478",
                  "--listen-tls", "", "--relay-addresses", "127.0.0.1"]


@pytest.fixture(autouse=True)
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cfg, "DEFAULT_CONFIG_PATH", str(tmp_path / "no-default.toml"))


def runner() -> CliRunner:
    return CliRunner()


# -- check ---------------------------------------------------------------------------------------

def test_check_ok_prints_summary_and_exits_0() -> None:
    result = runner().invoke(check, LOOPBACK_FLAGS, env={"TURND_SECRETS": "topsecret-1"})
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("configuration OK\n")
    assert "udp 127.0.0.1:3478; tcp 127.0.0.1:3478; tls off" in result.stdout
    assert "relay: 127.0.0.1, ports 49152-65535 (16384 ports)" in result.stdout
    assert "1 shared secret(s)" in result.stdout
    assert "file: none (built-in defaults" in result.stdout
    assert "topsecret-1" not in result.output
    # An 11-character secret is weak: a warning on stderr, naming no secret; still exit 0.
    assert result.stderr.startswith("warning: shared secret #1 carries about ")
    strong = runner().invoke(check, LOOPBACK_FLAGS, env={"TURND_SECRETS": "ab" * 32})
    assert strong.exit_code == 0 and strong.stderr == ""


def test_check_reads_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "turnd.toml"
    path.write_text('listen_udp = ["127.0.0.1:3478"]\nlisten_tcp = []\nlisten_tls = []\n'
                    'relay_addresses = ["127.0.0.1"]\nrelay_port_min = 40000\n'
                    'relay_port_max = 40999\n', encoding="utf-8")
    result = runner().invoke(check, ["--config", str(path)], env={})
    assert result.exit_code == 0, result.output
    assert "ports 40000-40999 (1000 ports)" in result.stdout
    assert f"file: {path}\n" in result.stdout
    # No credentials is not an error (serve makes a one-run secret), but it is said.
    assert "no shared secrets or static users yet" in result.stdout


def test_check_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "turnd.toml"
    path.write_text("relay_port_min = 40000\nrelay_port_max = 40999\n", encoding="utf-8")
    result = runner().invoke(check, ["--config", str(path), *LOOPBACK_FLAGS,
                                     "--relay-port-max", "41999"], env={})
    assert result.exit_code == 0, result.output
    assert "ports 40000-41999" in result.stdout


def test_check_load_problems_all_on_stderr_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "turnd.toml"
    path.write_text('relay_port_min = "x"\nbogus_key = 1\n', encoding="utf-8")
    result = runner().invoke(check, ["--config", str(path), "--max-connections", "0"],
                             env={"TURND_LOG_LEVEL": "loud"})
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert sorted(line.split(":", 1)[0] for line in lines) == ["bogus_key", "log_level",
                                                               "max_connections", "relay_port_min"]


def test_check_deep_problems_exit_2() -> None:
    result = runner().invoke(check, [*LOOPBACK_FLAGS, "--relay-addresses", "192.0.2.1",
                                     "--denied-peers", "10.0.0.1/8",
                                     "--relay-port-min", "50000", "--relay-port-max", "50001"],
                             env={})
    assert result.exit_code == 2
    assert "configuration OK" not in result.output
    options = {line.split(":", 1)[0] for line in result.stderr.splitlines()}
    assert options == {"relay_addresses", "denied_peers", "relay_port_max"}
    assert "192.0.2.1 is not an address of this host" in result.stderr


def test_check_missing_config_file(tmp_path: Path) -> None:
    result = runner().invoke(check, ["--config", str(tmp_path / "absent.toml")], env={})
    assert result.exit_code == 2
    assert result.stderr.startswith("config: cannot read")


def test_check_config_from_turnd_config_env(tmp_path: Path) -> None:
    path = tmp_path / "turnd.toml"
    path.write_text("max_connections = 0\n", encoding="utf-8")
    result = runner().invoke(check, [], env={"TURND_CONFIG": str(path)})
    assert result.exit_code == 2
    assert result.stderr.startswith("max_connections: must be at least 1")


# -- convert-coturn --------------------------------------------------------------------------------

def test_convert_prints_toml_with_notes_on_top_and_on_stderr(tmp_path: Path) -> None:
    result = runner().invoke(convert_coturn, [str(CONF)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("# NOTE line ")
    note_lines = [ln for ln in out.splitlines() if ln.startswith("# NOTE ")]
    stderr_notes = [ln for ln in result.stderr.splitlines() if ln.startswith("note: ")]
    assert len(note_lines) == len(stderr_notes) > 5
    assert SECRET not in result.output
    # The whole document, comments included, is a configuration turnd loads.
    path = tmp_path / "out.toml"
    path.write_text(out, encoding="utf-8")
    config = load_config(str(path), env={})
    assert config.realm == "turn.example.com"
    assert config.relay_port_min == 40000


def test_convert_writes_output_file(tmp_path: Path) -> None:
    out = tmp_path / "turnd.toml"
    result = runner().invoke(convert_coturn, [str(CONF), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    text = out.read_text(encoding="utf-8")
    assert "# NOTE line " in text and SECRET not in text
    assert load_config(str(out), env={}).external_addresses == ("203.0.113.7=10.0.0.5",)
    assert "note: " in result.stderr


def test_convert_resolves_relative_cert_against_the_coturn_file(tmp_path: Path) -> None:
    conf = tmp_path / "coturn" / "turnserver.conf"
    conf.parent.mkdir()
    conf.write_text("cert=tls/cert.pem\npkey=tls/key.pem\n", encoding="utf-8")
    result = runner().invoke(convert_coturn, [str(conf)])
    assert result.exit_code == 0
    assert f'tls_cert_file = "{tmp_path}/coturn/tls/cert.pem"' in result.stdout


def test_convert_unreadable_input_exit_2(tmp_path: Path) -> None:
    result = runner().invoke(convert_coturn, [str(tmp_path / "missing.conf")])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: cannot read {tmp_path}/missing.conf")


def test_convert_unwritable_output_exit_2(tmp_path: Path) -> None:
    result = runner().invoke(convert_coturn, [str(CONF), "-o",
                                              str(tmp_path / "no-such-dir" / "x.toml")])
    assert result.exit_code == 2
    assert "error: cannot write" in result.stderr
