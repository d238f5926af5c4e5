"""What an operator reads on the first day, through the real CLI and a running server: the
start-up line, a clear "address in use", the shutdown summary, `turnd --help`, the IP:PORT
wording, and a generated secret per instance."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from click.testing import CliRunner

from turnserver.cli import main

from .server import RunningServer, bind_outside_relay_range, start_server


def test_the_start_up_line_says_version_configuration_workers_and_listeners(
        server_factory: Callable[..., RunningServer]) -> None:
    from turnserver import __version__

    server = server_factory(listen_tcp=["127.0.0.1:0"])
    line = next(line for line in server.log_text().splitlines() if " started: " in line)
    udp, tcp = server.port("udp"), server.port("tcp")
    assert (f"turnd {__version__} started: configuration {server.config_path}; 1 worker; "
            f"listening udp 127.0.0.1:{udp}, tcp 127.0.0.1:{tcp}; relaying on 127.0.0.1") in line


def test_address_in_use_names_the_socket(tmp_path: Path) -> None:
    taken = bind_outside_relay_range(socket.SOCK_DGRAM)
    port = taken.getsockname()[1]
    try:
        server = start_server(tmp_path / "turnd", wait=False, listen_udp=[f"127.0.0.1:{port}"])
        assert server.proc.wait(timeout=15) == 1
    finally:
        taken.close()
    assert f"cannot start: udp 127.0.0.1:{port}: Address already in use" in server.log_text()


def test_a_metrics_port_in_use_names_metrics_listen(tmp_path: Path) -> None:
    taken = bind_outside_relay_range(socket.SOCK_STREAM)
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        server = start_server(tmp_path / "turnd", wait=False, metrics_listen=f"127.0.0.1:{port}")
        assert server.proc.wait(timeout=15) == 1
    finally:
        taken.close()
    assert f"cannot start: metrics_listen 127.0.0.1:{port}: Address already in use" in server.log_text()


def test_the_text_shutdown_summary_prints_each_number_once(server_factory: Callable[..., RunningServer]) -> None:
    server = server_factory(listen_tcp=["127.0.0.1:0"])
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port("tcp")), timeout=5):
            pass
    time.sleep(0.3)
    server.stop()
    (line,) = [line for line in server.log_text().splitlines() if "stream connections" in line]
    assert "accepted.tcp=3" in line and "closed.peer_closed=3" in line
    # Every counter once, as a field: none repeated in the message before the fields.
    keys = re.findall(r"(\S+)=\d+", line)
    assert len(keys) == len(set(keys)) and "accepted tcp=" not in line, line


def test_help_shows_each_commands_whole_first_line() -> None:
    result = CliRunner().invoke(main, ["--help"], terminal_width=100)
    text = " ".join(result.output.split())
    commands = result.output.split("Commands:", 1)[1]
    assert "..." not in commands
    for command in main.commands.values():
        first = " ".join(command.help.strip().split("\n\n")[0].split())
        assert first in text, first


def test_listener_options_say_ip_port_and_a_host_name_gets_a_clear_answer(tmp_path: Path) -> None:
    help_text = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).output
    for flag in ("--listen-udp", "--listen-tcp", "--listen-tls", "--metrics-listen",
                 "--alternate-server"):
        (line,) = [l for l in help_text.splitlines() if l.strip().startswith(flag + " ")]
        assert "IP:PORT" in line, line
    assert "HOST:PORT" not in help_text and "host:port" not in help_text
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURND_")}
    result = subprocess.run([sys.executable, "-m", "turnserver", "check", "--listen-udp",
                             "turn.example.com:3478"], capture_output=True, text=True, env=env,
                            timeout=30, cwd=tmp_path)
    assert result.returncode == 2
    assert re.search(r"listen_udp: 'turn.example.com:3478' is not a valid \"IP:PORT\" \(an IP "
                     r"address, not a host name\)", result.stderr), result.stderr


def test_two_instances_without_secrets_write_two_secret_files(tmp_path: Path) -> None:
    # One instance per relay address (docs/deploy.md): neither overwrites the other's secret.
    state = tmp_path / "state"
    state.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURND_")}
    env["STATE_DIRECTORY"] = str(state)
    procs = []
    try:
        for i in range(2):
            ready = tmp_path / f"ready{i}"
            procs.append((ready, subprocess.Popen(
                [sys.executable, "-m", "turnserver", "serve", "--listen-udp", "127.0.0.1:0",
                 "--listen-tcp", "", "--listen-tls", "", "--relay-addresses", "127.0.0.1",
                 "--relay-port-min", str(51000 + 100 * i), "--relay-port-max", str(51099 + 100 * i),
                 "--metrics-listen", "", "--ready-file", str(ready)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)))
            deadline = time.monotonic() + 15
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ready.exists()
        files = sorted(state.glob("turnd-generated-secret*"))
        assert len(files) == 2, files
        assert files[0].read_text() != files[1].read_text()
    finally:
        for _, proc in procs:
            proc.terminate()
            proc.wait(timeout=15)
