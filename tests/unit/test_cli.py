"""The turnd command line: mint, and serve's refusal of bad configuration."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import stat
import subprocess
import sys
import time

from click.testing import CliRunner

from turnserver.cli import main
from turnserver.config import Config

SECRET = "cli-test-secret"


def expected_password(username: str, secret: str = SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()


def run(args: list[str], env: dict[str, str] | None = None):
    return CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False)


def test_mint_prints_ice_servers_for_a_browser() -> None:
    before = int(time.time())
    result = run(["mint", "--user", "alice", "--ttl", "120", "--host", "turn.example.com"], {"TURND_SECRETS": SECRET})
    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)
    turn, stun = config["iceServers"]
    expiry, user = turn["username"].split(":")
    assert user == "alice" and before + 120 <= int(expiry) <= int(time.time()) + 120
    assert turn["credential"] == expected_password(turn["username"])
    assert turn["urls"] == ["turn:turn.example.com:3478?transport=udp", "turn:turn.example.com:3478?transport=tcp",
                            "turns:turn.example.com:5349?transport=tcp"]
    assert stun == {"urls": ["stun:turn.example.com:3478"]}


def test_mint_plain_form_reads_the_secrets_file_and_uses_the_first_secret(tmp_path) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text(f"{SECRET}\nolder-secret\n")
    result = run(["mint", "--user", "bob", "--secrets-file", str(secrets), "--format", "plain", "--host", "::1"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line and line[0].isupper())
    assert lines["PASSWORD"] == expected_password(lines["USERNAME"])
    assert "turn:[::1]:3478?transport=udp" in result.stdout


def test_mint_uses_ports_and_public_host_from_the_configuration(tmp_path) -> None:
    config = tmp_path / "turnd.toml"
    config.write_text('public_host = "relay.example.net"\nlisten_udp = ["0.0.0.0:443"]\n'
                      'listen_tcp = []\nlisten_tls = ["0.0.0.0:443"]\n')
    result = run(["mint", "--user", "c", "--config", str(config)], {"TURND_SECRETS": SECRET})
    assert result.exit_code == 0, result.output
    urls = json.loads(result.stdout)["iceServers"][0]["urls"]
    assert urls == ["turn:relay.example.net:443?transport=udp", "turns:relay.example.net:443?transport=tcp"]


def test_mint_without_a_secret_fails_clearly() -> None:
    result = CliRunner().invoke(main, ["mint", "--user", "x", "--host", "h"], env={"TURND_SECRETS": ""})
    assert result.exit_code == 2
    assert "TURND_SECRETS" in result.stderr and "secrets_file" in result.stderr


def test_mint_refuses_a_colon_in_the_user() -> None:
    result = CliRunner().invoke(main, ["mint", "--user", "a:b", "--host", "h"], env={"TURND_SECRETS": SECRET})
    assert result.exit_code == 2 and "--user" in result.stderr


def test_mint_has_no_way_to_take_the_secret_from_argv() -> None:
    result = CliRunner().invoke(main, ["mint", "--help"])
    assert "--secret " not in result.stdout and "--secrets-file" in result.stdout


def test_serve_refuses_bad_configuration_naming_each_option(tmp_path) -> None:
    env = dict(os.environ, TURND_SECRETS=SECRET)
    result = subprocess.run(
        [sys.executable, "-m", "turnserver", "serve", "--relay-addresses", "192.0.2.77", "--allowed-peers", "10.0.0.0/33",
         "--listen-udp", "127.0.0.1:0", "--listen-tcp", "", "--listen-tls", ""],
        capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "relay_addresses" in result.stderr and "allowed_peers" in result.stderr
    value_error = subprocess.run([sys.executable, "-m", "turnserver", "serve", "--relay-port-min", "70000"],
                                 capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert value_error.returncode == 2 and "relay_port_min" in value_error.stderr


def test_serve_writes_a_generated_secret_to_a_private_file_when_not_on_a_terminal(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TURND_SECRETS"}
    env.update(STATE_DIRECTORY=str(tmp_path), HOME=str(tmp_path))
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "turnserver", "serve", "--listen-udp", "127.0.0.1:0", "--listen-tcp", "",
         "--listen-tls", "", "--relay-addresses", "127.0.0.1", "--metrics-listen", "", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 15
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ready.exists()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    # Not the default listeners: the file is keyed by them (one per instance).
    (secret_file,) = tmp_path.glob("turnd-generated-secret-*")
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32
    assert secret_file.stat().st_mode & 0o077 == 0
    assert secret not in err and secret not in out
    assert str(secret_file) in err


def _generate_in(directory, monkeypatch) -> tuple[str, str]:
    """_generated_secret as under systemd: stderr not a terminal, STATE_DIRECTORY set."""
    from turnserver import cli

    stderr = io.StringIO()
    monkeypatch.setenv("STATE_DIRECTORY", str(directory))
    monkeypatch.setattr(sys, "stderr", stderr)
    return cli._generated_secret(Config()), stderr.getvalue()


def test_generated_secret_replaces_a_world_readable_file_with_a_private_one(tmp_path, monkeypatch) -> None:
    path = tmp_path / "turnd-generated-secret"
    path.write_text("an older secret\n")
    path.chmod(0o644)
    secret, err = _generate_in(tmp_path, monkeypatch)
    assert path.read_text() == secret + "\n"
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    assert secret not in err and str(path) in err


def test_generated_secret_does_not_follow_a_symlink(tmp_path, monkeypatch) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not turnd's\n")
    target.chmod(0o644)
    path = tmp_path / "turnd-generated-secret"
    path.symlink_to(target)
    secret, _ = _generate_in(tmp_path, monkeypatch)
    assert target.read_text() == "not turnd's\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not path.is_symlink()
    assert path.read_text() == secret + "\n"
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600


def test_serve_without_a_writable_place_for_a_generated_secret_names_secrets_file(tmp_path) -> None:
    # The systemd unit's user has no home; without StateDirectory= there is nowhere to write.
    env = {k: v for k, v in os.environ.items() if k not in ("TURND_SECRETS", "STATE_DIRECTORY")}
    env["HOME"] = str(tmp_path / "no-such-home")
    result = subprocess.run(
        [sys.executable, "-m", "turnserver", "serve", "--listen-udp", "127.0.0.1:0", "--listen-tcp", "",
         "--listen-tls", "", "--relay-addresses", "127.0.0.1", "--metrics-listen", ""],
        capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "secrets_file" in result.stderr and str(tmp_path / "no-such-home") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _mint_with_listeners(tmp_path, toml: str, env: dict[str, str] | None = None):
    config = tmp_path / "turnd.toml"
    config.write_text('public_host = "relay.example.net"\n' + toml)
    return CliRunner().invoke(main, ["mint", "--user", "c", "--config", str(config), "--format", "plain"],
                              env={"TURND_SECRETS": SECRET, **(env or {})})


def _urls(result) -> list[str]:
    return [line.removeprefix("URL=") for line in result.stdout.splitlines() if line.startswith("URL=")]


def test_mint_reports_a_listener_without_a_port_as_a_configuration_error(tmp_path) -> None:
    result = _mint_with_listeners(tmp_path, "", {"TURND_LISTEN_UDP": "3478"})
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "configuration has problems" in result.stderr
    assert "listen_udp" in result.stderr and "'3478'" in result.stderr


def test_mint_lists_no_udp_or_stun_urls_without_a_udp_listener(tmp_path) -> None:
    result = _mint_with_listeners(tmp_path, 'listen_udp = []\nlisten_tcp = ["0.0.0.0:3478"]\n'
                                            'listen_tls = ["0.0.0.0:5349"]\n')
    assert result.exit_code == 0, result.output
    assert _urls(result) == ["turn:relay.example.net:3478?transport=tcp",
                             "turns:relay.example.net:5349?transport=tcp"]


def test_mint_skips_listeners_on_port_zero(tmp_path) -> None:
    result = _mint_with_listeners(tmp_path, 'listen_udp = ["127.0.0.1:0", "0.0.0.0:3479"]\n'
                                            'listen_tcp = ["0.0.0.0:0"]\nlisten_tls = []\n')
    assert result.exit_code == 0, result.output
    assert _urls(result) == ["stun:relay.example.net:3479", "turn:relay.example.net:3479?transport=udp"]


def test_mint_with_no_fixed_listener_port_is_a_configuration_error(tmp_path) -> None:
    result = _mint_with_listeners(tmp_path, 'listen_udp = ["127.0.0.1:0"]\nlisten_tcp = []\nlisten_tls = []\n')
    assert result.exit_code == 2
    assert "configuration has problems" in result.stderr and "listen_udp" in result.stderr
    assert "URL=" not in result.stdout


def test_two_instances_never_share_a_generated_secret_file(tmp_path, monkeypatch) -> None:
    from turnserver import cli

    default = cli._generated_secret_path(str(tmp_path), Config())
    assert default == str(tmp_path / "turnd-generated-secret")
    other = Config(listen_udp=("127.0.0.1:3479",), listen_tcp=(), listen_tls=())
    keyed = cli._generated_secret_path(str(tmp_path), other)
    assert keyed != default and keyed.startswith(default + "-")
    assert cli._generated_secret_path(str(tmp_path), other) == keyed  # stable per listeners
    # A file that a running instance holds is never taken over.
    (tmp_path / "turnd-generated-secret").write_text("the first instance's\n")
    cli._hold(default)
    try:
        assert cli._generated_secret_path(str(tmp_path), Config()) == default + ".2"
    finally:
        os.close(cli._held.pop())
    assert cli._generated_secret_path(str(tmp_path), Config()) == default


def test_the_start_up_hint_names_the_flags_the_server_was_started_with(tmp_path, monkeypatch) -> None:
    from turnserver import cli

    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    config = Config(listen_udp=("0.0.0.0:3479",), listen_tcp=(), listen_tls=("0.0.0.0:443",),
                    public_host="turn.example.com")
    cli._generated_secret(config, "/etc/turnd/custom.toml")
    hint = stderr.getvalue()
    command = next(line for line in hint.splitlines() if "turnd mint" in line)
    assert command.endswith("turnd mint --user alice --host turn.example.com --config "
                            "/etc/turnd/custom.toml --listen-udp 0.0.0.0:3479 --listen-tcp '' "
                            "--listen-tls 0.0.0.0:443")
    # A command to paste: the shell reads it as it is (no placeholder in angle brackets).
    import shlex

    words = shlex.split(command.split("turnd mint", 1)[1])
    assert words[:4] == ["--user", "alice", "--host", "turn.example.com"]


def test_mint_takes_the_listener_flags_and_lists_every_port_443_first() -> None:
    from click.testing import CliRunner

    from turnserver.cli import main

    result = CliRunner().invoke(main, [
        "mint", "--user", "alice", "--host", "turn.example.com", "--format", "plain",
        "--listen-udp", "0.0.0.0:3479", "--listen-tcp", "0.0.0.0:3479",
        "--listen-tls", "0.0.0.0:5349", "--listen-tls", "[::]:5349", "--listen-tls", "0.0.0.0:443"],
        env={"TURND_SECRETS": "s" * 40})
    assert result.exit_code == 0, result.output
    urls = [line[4:] for line in result.output.splitlines() if line.startswith("URL=")]
    assert urls == ["stun:turn.example.com:3479", "turn:turn.example.com:3479?transport=udp",
                    "turn:turn.example.com:3479?transport=tcp",
                    "turns:turn.example.com:443?transport=tcp",
                    "turns:turn.example.com:5349?transport=tcp"]
    # The environment, as serve reads it.
    env_result = CliRunner().invoke(main, ["mint", "--user", "bob", "--host", "h.example", "--format", "plain"],
                                    env={"TURND_SECRETS": "s" * 40, "TURND_LISTEN_TLS": "0.0.0.0:443",
                                         "TURND_LISTEN_UDP": "", "TURND_LISTEN_TCP": ""})
    assert env_result.exit_code == 0, env_result.output
    assert [line for line in env_result.output.splitlines() if line.startswith("URL=")] == [
        "URL=turns:h.example:443?transport=tcp"]
