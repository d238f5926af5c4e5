"""Start and stop the two servers under test on 127.0.0.1: turnd and coturn's ``turnserver``.

Both get the same realm, the same TURN REST shared secret, their own relay port range on
127.0.0.1 and, when the machine has two cores or more, the same pinned core. Each is started by
this module and stopped by its PID, never by name. When asked, both also get a TLS listener with
the same self-signed certificate and key (:func:`make_tls_files`).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from turnserver.config import toml_literal
from turnserver.stun import MessageClass, Method, Message, decode_message, encode_message
from turnserver.stun.errors import StunDecodeError

from . import procfs

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SECRET = "benchmark-shared-secret"
REALM = "bench.turnd"
# Below the kernel's ephemeral range (32768-60999 by default) so relay ports never collide with
# the load generator's own sockets, and away from the integration tests' 50000-50999.
TURND_RELAY_PORTS = (21000, 23999)
COTURN_RELAY_PORTS = (24000, 26999)
# When a second turnd ("turnd-pure") is measured too, the two split turnd's range, so that they
# can run at the same time (--quick) without taking each other's ports.
# When a turnd variant runs beside turnd (at once, in --quick): its own range, as wide as
# turnd's, below the kernel's ephemeral range and apart from coturn's.
TURND_SPLIT_RELAY_PORTS = {"turnd": TURND_RELAY_PORTS, "turnd-pure": (27000, 29999)}
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
# How long the self-signed certificate of a run is valid: far longer than any run, and long
# enough that turnd does not warn at start-up that it expires soon.
TLS_CERT_LIFETIME = datetime.timedelta(days=90)

SERVER_NAMES = ("turnd", "coturn")
# turnd variants that can be measured beside the default one: name -> environment.
TURND_VARIANTS: dict[str, dict[str, str]] = {"turnd-pure": {"TURND_PURE_PYTHON": "1"}}


def coturn_available() -> bool:
    """True when coturn's server and load generator are both installed."""
    return shutil.which("turnserver") is not None and shutil.which("turnutils_uclient") is not None


def pinned(command: list[str], cpu: int | Sequence[int] | None) -> list[str]:
    """Prefix ``taskset`` so the process (and every thread it starts) runs on that core only, or
    on those cores when given several."""
    if cpu is None or shutil.which("taskset") is None:
        return command
    cpus = [cpu] if isinstance(cpu, int) else list(cpu)
    if not cpus:
        return command
    return ["taskset", "-c", ",".join(str(c) for c in cpus), *command]


def parse_cpu_list(text: str) -> list[int]:
    """``"0"``, ``"0-3"``, ``"0,2,4-5"`` -> sorted CPU numbers; ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        first, last = int(low), int(high) if sep else int(low)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError("empty CPU list")
    return sorted(cpus)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM certificate and unencrypted key both servers' TLS listeners use."""

    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A fresh self-signed certificate (EC P-256, subjectAltName 127.0.0.1 and localhost) and
    its key, written as ``tls-cert.pem`` and ``tls-key.pem`` (mode 0600) into ``directory``.

    Neither load generator verifies it (turnutils_uclient verifies only when given ``-E``); the
    same files go to turnd and coturn so that both serve the same key type and size.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "turnd benchmark")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + TLS_CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(directory / "tls-cert.pem", directory / "tls-key.pem")
    for path, data in (
        (files.cert, cert.public_bytes(serialization.Encoding.PEM)),
        (files.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())),
    ):
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    return files


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now (coturn needs a fixed one)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind((HOST, port))
            except OSError:
                continue
            return int(port)
        finally:
            udp.close()
            tcp.close()
    raise RuntimeError("no free port on 127.0.0.1")


def free_port_pair() -> tuple[int, int]:
    """Two different free ports (see :func:`free_port`), not next to each other: coturn also
    listens on "port plus one" (its alternative port) when it can."""
    first = free_port()
    for _ in range(50):
        second = free_port()
        if abs(second - first) > 1:
            return first, second
    raise RuntimeError("no second free port on 127.0.0.1")


def stun_binding_ok(port: int, timeout_s: float = 0.3) -> bool:
    """One Binding request over UDP: does something answer STUN on that port?"""
    request = Message(Method.BINDING, MessageClass.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.sendto(encode_message(request), (HOST, port))
            data, _ = sock.recvfrom(2048)
        except OSError:
            return False
    try:
        reply = decode_message(data)
    except StunDecodeError:
        return False
    return reply.transaction_id == request.transaction_id and reply.msg_class == MessageClass.SUCCESS


def stun_binding_tls_ok(port: int, timeout_s: float = 1.0) -> bool:
    """One Binding request over TLS (certificate not verified): is a TLS listener up there?"""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    request = Message(Method.BINDING, MessageClass.REQUEST)
    data = b""
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as raw:
            with ctx.wrap_socket(raw) as sock:
                sock.sendall(encode_message(request))
                # A stream: read the 20-byte header, then the length it gives (bounded).
                while len(data) < 20 or len(data) < 20 + int.from_bytes(data[2:4], "big"):
                    chunk = sock.recv(2048)
                    if not chunk or len(data) > 4096:
                        return False
                    data += chunk
    except (OSError, ValueError):
        return False
    try:
        reply = decode_message(data[:20 + int.from_bytes(data[2:4], "big")])
    except StunDecodeError:
        return False
    return reply.transaction_id == request.transaction_id and reply.msg_class == MessageClass.SUCCESS


@dataclass
class ServerUnderTest:
    """One running server process and where it listens."""

    name: str  # "turnd" or "coturn"
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]  # transport -> port on 127.0.0.1
    workdir: Path
    log_path: Path
    command: list[str] = field(default_factory=list)
    secret: str = SECRET
    realm: str = REALM

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def is_turnd(self) -> bool:
        return self.name == "turnd" or self.name in TURND_VARIANTS

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        return procfs.rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        """CPU time of the server and of every process it started (worker processes)."""
        return sum(procfs.cpu_seconds(pid) for pid in process_tree(self.pid))

    def stop(self) -> int:
        """Stop the process this module started, by its PID; SIGKILL if it lingers."""
        if self.alive():
            # turnd stops at once on SIGINT (SIGTERM may drain allocations for minutes);
            # coturn stops on either.
            self.proc.send_signal(signal.SIGINT if self.is_turnd else signal.SIGTERM)
            try:
                return self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=STOP_TIMEOUT_S)


def process_tree(pid: int, limit: int = 256) -> list[int]:
    """``pid`` and its descendants, from /proc/<pid>/task/*/children (bounded)."""
    out, todo = [], [pid]
    while todo and len(out) < limit:
        current = todo.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as handle:
                    todo.extend(int(child) for child in handle.read().split())
            except (OSError, ValueError):
                continue
    return out


def _wait_until(check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str,
                log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log_path)}")
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=STOP_TIMEOUT_S)
    raise RuntimeError(f"{what} did not become ready within {START_TIMEOUT_S} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_turnd(workdir: Path, *, cpu: int | Sequence[int] | None, tcp: bool = True,
                relay_ports: tuple[int, int] = TURND_RELAY_PORTS,
                extra_options: dict[str, object] | None = None,
                env_extra: dict[str, str] | None = None, workers: int | None = None,
                name: str = "turnd", tls: TlsFiles | None = None) -> ServerUnderTest:
    """``python -m turnserver serve`` from this working tree, UDP (and TCP) on port 0, and a
    TLS listener on port 0 serving ``tls`` when given.

    ``extra_options`` are added to (or replace) the configuration below. ``workers``, when
    given, becomes ``workers = N`` in the configuration (absent otherwise, so a turnd without
    that option still starts). ``env_extra`` is added to the server's environment.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    secrets = workdir / "secrets"
    secrets.write_text(SECRET + "\n")
    options: dict[str, object] = {
        "listen_udp": [f"{HOST}:0"],
        "listen_tcp": [f"{HOST}:0"] if tcp else [],
        "listen_tls": [f"{HOST}:0"] if tls is not None else [],
        **({"tls_cert_file": str(tls.cert), "tls_key_file": str(tls.key)} if tls is not None else {}),
        "relay_addresses": [HOST],
        "relay_port_min": relay_ports[0],
        "relay_port_max": relay_ports[1],
        "metrics_listen": "",
        "realm": REALM,
        "secrets_file": str(secrets),
        # turnutils_uclient binds channels from RFC 5766's 0x4000-0x7FFF.
        "legacy_channel_numbers": True,
        # Same as coturn: one line per allocation, nothing per packet.
        "log_level": "info",
        # coturn's defaults limit neither allocations nor 401 answers: neither does turnd here,
        # or the allocation benchmarks (one source, one user) would measure the limits.
        "user_quota": 0,
        "max_allocations": 0,
        "challenge_rate_per_source": 0,
        # turnutils_uclient -T (tcp_relay) opens 40+ peer connections on a few of its
        # allocations, and more than 256 connections from its one address at its peak;
        # coturn limits neither.
        "max_tcp_connections_per_allocation": 0,
        "max_connections_per_source": 0,
        # The bandwidth check stays on the relay path, at a cap no benchmark reaches, so that
        # its cost is inside every relay number (benchmarks/bandwidth_check.py measures it).
        "allocation_bandwidth_bytes_s": 10**10,
        **({"workers": workers} if workers is not None else {}),
        **(extra_options or {}),
    }
    config = workdir / "turnd.toml"
    config.write_text("".join(f"{k} = {toml_literal(v)}\n" for k, v in options.items()))
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / "turnd.log"
    env = dict(os.environ)
    env.pop("TURND_SECRETS", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = pinned([sys.executable, "-m", "turnserver", "serve", "--config", str(config),
                      "--ready-file", str(ready)], cpu)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                cwd=str(REPO_ROOT))
    _wait_until(ready.exists, proc, "turnd", log_path)
    info = json.loads(ready.read_text())
    ports = {lst["transport"]: int(lst["port"]) for lst in info["listeners"]
             if lst["transport"] in ("udp", "tcp", "tls")}
    server = ServerUnderTest(name, proc, ports, workdir, log_path, command)
    _wait_until(lambda: stun_binding_ok(ports["udp"]), proc, "turnd", log_path)
    if tls is not None:
        if "tls" not in ports:
            server.stop()
            raise RuntimeError(f"turnd reported no tls listener in {ready}:\n{_tail(log_path)}")
        _wait_until(lambda: stun_binding_tls_ok(ports["tls"]), proc, "turnd (TLS)", log_path)
    return server


def start_coturn(workdir: Path, *, cpu: int | Sequence[int] | None,
                 relay_ports: tuple[int, int] = COTURN_RELAY_PORTS,
                 relay_threads: int | None = None, tls: TlsFiles | None = None) -> ServerUnderTest:
    """coturn's ``turnserver`` with no config file, UDP and TCP on one fixed port;
    ``--relay-threads N`` when ``relay_threads`` is given (coturn's default otherwise).

    With ``tls``: a TLS listener on a second fixed port (``--tls-listening-port``) serving that
    certificate and key; without it ``--no-tls``. DTLS is always off (``--no-dtls``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "coturn.log"
    last_error: Exception | None = None
    # A port found free can be taken before coturn binds it; try a few.
    for _ in range(3):
        port, tls_port = free_port_pair() if tls is not None else (free_port(), None)
        tls_options = (["--no-tls"] if tls is None else
                       [f"--tls-listening-port={tls_port}", f"--cert={tls.cert}", f"--pkey={tls.key}"])
        command = pinned([
            "turnserver", "-n",
            f"--listening-ip={HOST}", f"--relay-ip={HOST}", f"--listening-port={port}",
            f"--min-port={relay_ports[0]}", f"--max-port={relay_ports[1]}",
            "--use-auth-secret", f"--static-auth-secret={SECRET}", f"--realm={REALM}",
            "--allow-loopback-peers", "--no-cli", *tls_options, "--no-dtls",
            f"--log-file={log_path}", "--simple-log", f"--pidfile={workdir / 'coturn.pid'}",
            *([f"--relay-threads={relay_threads}"] if relay_threads is not None else []),
        ], cpu)
        with open(workdir / "coturn.out", "wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        try:
            _wait_until(lambda: stun_binding_ok(port), proc, "coturn", log_path)
            if tls is not None and tls_port is not None:
                secure_port: int = tls_port
                _wait_until(lambda: stun_binding_tls_ok(secure_port), proc, "coturn (TLS)", log_path)
                _check_coturn_tls_log(log_path, tls)
        except RuntimeError as exc:
            last_error = exc
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
            continue
        ports = {"udp": port, "tcp": port, **({"tls": tls_port} if tls_port is not None else {})}
        return ServerUnderTest("coturn", proc, ports, workdir, log_path, command)
    raise RuntimeError(f"coturn did not start: {last_error}")


def _check_coturn_tls_log(log_path: Path, tls: TlsFiles) -> None:
    """coturn logs "TLS supported" and, for each TLS method, "Certificate file found: FILE" and
    "Private key file found: FILE" once it has loaded them: both must name this run's files."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    missing = [what for what in ("TLS supported", f"Certificate file found: {tls.cert}",
                                 f"Private key file found: {tls.key}") if what not in text]
    if missing:
        raise RuntimeError(f"coturn's log lacks {missing}:\n{_tail(log_path)}")


def start(name: str, workdir: Path, *, cpu: int | Sequence[int] | None, workers: int | None = None,
          turnd_env: dict[str, str] | None = None, extra_options: dict[str, object] | None = None,
          relay_ports: tuple[int, int] | None = None, tls: TlsFiles | None = None) -> ServerUnderTest:
    """Start ``name``: "turnd", a variant of it (:data:`TURND_VARIANTS`) or "coturn".

    ``workers`` is turnd's ``workers`` option and coturn's ``--relay-threads``; ``turnd_env``
    and ``extra_options`` (configuration) apply to turnd and its variants only. ``tls`` adds a
    TLS listener serving those files (its port is ``ports["tls"]``).
    """
    if name == "turnd" or name in TURND_VARIANTS:
        env = {**(turnd_env or {}), **TURND_VARIANTS.get(name, {})}
        return start_turnd(workdir, cpu=cpu, workers=workers, env_extra=env, extra_options=extra_options,
                           relay_ports=relay_ports or TURND_RELAY_PORTS, name=name, tls=tls)
    if name == "coturn":
        return start_coturn(workdir, cpu=cpu, relay_threads=workers,
                            relay_ports=relay_ports or COTURN_RELAY_PORTS, tls=tls)
    raise ValueError(f"unknown server {name!r}")


def coturn_version() -> str:
    try:
        out = subprocess.run(["turnserver", "--version"], capture_output=True, timeout=5, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"
