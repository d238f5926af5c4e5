"""Start the real ``turnd serve`` process on loopback for integration tests.

Every server listens on 127.0.0.1 with port 0 and reports its bound ports through
``--ready-file``; tests stop only the process they started, by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turnserver.config import toml_literal
from turnserver.credentials import mint_credentials

SECRET = "integration-test-secret"
RELAY_PORTS = (50000, 50999)
START_TIMEOUT_S = 15.0


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    workdir: Path
    config_path: Path
    log_path: Path
    secret: str = SECRET
    options: dict[str, Any] = field(default_factory=dict)

    def port(self, transport: str = "udp") -> int:
        for lst in self.info["listeners"]:
            if lst["transport"] == transport:
                return int(lst["port"])
        raise KeyError(f"no {transport} listener")

    def address(self, transport: str = "udp") -> tuple[str, int]:
        return ("127.0.0.1", self.port(transport))

    def credentials(self, user: str = "alice", ttl_s: int = 600, secret: str | None = None) -> tuple[str, str]:
        creds = mint_credentials(secret or self.secret, user, ttl_s)
        return creds.username, creds.password

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=timeout_s)


def bind_outside_relay_range(kind: int) -> socket.socket:
    """A socket bound on 127.0.0.1 to a kernel-chosen port outside RELAY_PORTS: the kernel's
    ephemeral range holds the relay range, and a listener inside it is a configuration error
    (exit 2). For tests that need a fixed listening port, or a port some socket holds."""
    for _ in range(50):
        sock = socket.socket(socket.AF_INET, kind)
        sock.bind(("127.0.0.1", 0))
        if not RELAY_PORTS[0] <= sock.getsockname()[1] <= RELAY_PORTS[1]:
            return sock
        sock.close()
    raise AssertionError("no ephemeral port outside the relay port range in 50 tries")


def base_options() -> dict[str, Any]:
    return {
        "listen_udp": ["127.0.0.1:0"],
        "listen_tcp": [],
        "listen_tls": [],
        "relay_addresses": ["127.0.0.1"],
        "relay_port_min": RELAY_PORTS[0],
        "relay_port_max": RELAY_PORTS[1],
        "metrics_listen": "",
        "realm": "test.turnd",
        "log_level": "info",
        # One process unless a test asks for workers (tests/integration/test_workers.py).
        "workers": 1,
        # No admin socket unless a test asks (tests/integration/test_admin.py): never two
        # servers on one path.
        "admin_socket": "",
    }


def start_server(workdir: Path, *, env: dict[str, str] | None = None, secrets: list[str] | None = None,
                 extra_args: list[str] | None = None, wait: bool = True, **options: Any) -> RunningServer:
    """Write a TOML config from the base options plus ``options`` and start ``turnd serve``."""
    workdir.mkdir(parents=True, exist_ok=True)
    merged = base_options()
    merged.update(options)
    secrets_path = workdir / "secrets"
    secrets_path.write_text("\n".join(secrets or [SECRET]) + "\n")
    secrets_path.chmod(0o600)  # as an operator keeps it: a file every user reads is warned about
    merged.setdefault("secrets_file", str(secrets_path))
    config_path = workdir / "turnd.toml"
    config_path.write_text("".join(f"{k} = {toml_literal(v)}\n" for k, v in merged.items()))
    ready = workdir / "ready.json"
    if ready.exists():
        ready.unlink()
    log_path = workdir / "turnd.log"
    log_file = open(log_path, "wb")
    run_env = dict(os.environ)
    run_env.pop("TURND_SECRETS", None)
    run_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "turnserver", "serve", "--config", str(config_path),
         "--ready-file", str(ready), *(extra_args or [])],
        stdout=log_file, stderr=subprocess.STDOUT, env=run_env,
    )
    log_file.close()
    server = RunningServer(proc, {}, workdir, config_path, log_path, options=merged)
    if not wait:
        return server
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready.exists():
            server.info = json.loads(ready.read_text())
            return server
        if proc.poll() is not None:
            raise RuntimeError(f"turnd exited with {proc.returncode}:\n{server.log_text()}")
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"turnd did not become ready:\n{server.log_text()}")
