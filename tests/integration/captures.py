"""Captures of real TURN clients' traffic, for replaying (mutated) at a running server.

A capture holds what independent clients sent to a server, client to server only, one list
of messages per client connection or client address. The files are in
``tests/data/captures/`` (its README.md describes the format); :func:`load_captures` reads
them. They are made by running the clients against a real ``turnd`` through
:class:`RecordingProxy`, a small UDP and TCP relay on 127.0.0.1 that writes down every
datagram, and every STUN message or ChannelData frame of a stream, that a client sends:

    python3 -m tests.integration.captures record            # aioice and coturn's tools
    python3 -m tests.integration.captures record chromium   # Chromium (root: a network namespace)

Recording needs aioice, coturn's turnutils_* tools and, for Chromium, /usr/bin/chromium,
Playwright and ``ip netns`` (the tests/browser/ machinery); replaying needs none of them.
All traffic stays on 127.0.0.1 (Chromium's inside a network namespace of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CAPTURE_DIR = REPO / "tests" / "data" / "captures"
FORMAT = "turnd-capture/1"
# Every STUN message is kept; of the data frames (ChannelData, RTP on a stream) only the first
# few per session, which is all a mutator needs of them and keeps the files small.
MAX_DATA_FRAMES = 12
MAX_MESSAGES = 200
STEP_TIMEOUT_S = 30.0


@dataclass
class Capture:
    name: str
    client: str
    transport: str  # "udp" or "tcp": how the messages were carried (and cut)
    sessions: list[list[bytes]]

    @property
    def messages(self) -> list[bytes]:
        return [m for session in self.sessions for m in session]


def load_captures(directory: Path = CAPTURE_DIR) -> list[Capture]:
    captures = []
    for path in sorted(directory.glob("*.json")):
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        sessions = [[base64.b64decode(m) for m in s["messages"]] for s in doc["sessions"]]
        captures.append(Capture(path.stem, doc["client"], doc["transport"], sessions))
    return captures


def frame_size(data: bytes | bytearray, offset: int = 0) -> int | None:
    """The size on a stream of the frame at ``offset`` (RFC 8656 §12.5: ChannelData padded to a
    multiple of 4), or None when the bytes there are neither STUN nor ChannelData or the header
    is not all there yet."""
    if len(data) - offset < 4:
        return None
    first = data[offset]
    length = int.from_bytes(data[offset + 2:offset + 4], "big")
    if first < 0x40:
        return 20 + length
    if first < 0x80:
        return 4 + ((length + 3) & ~3)
    return None


def split_stream(data: bytes) -> tuple[list[bytes], bytes]:
    """Cut a client's byte stream into frames; the second value is what was left over."""
    frames, offset = [], 0
    while True:
        size = frame_size(data, offset)
        if size is None or offset + size > len(data):
            return frames, data[offset:]
        frames.append(data[offset:offset + size])
        offset += size


def is_stun(frame: bytes) -> bool:
    return len(frame) >= 20 and frame[0] < 0x40 and frame[4:8] == b"\x21\x12\xa4\x42"


# --------------------------------------------------------------------------- the proxy


@dataclass
class _Session:
    transport: str
    messages: list[bytes] = field(default_factory=list)
    data_frames: int = 0
    leftover: bytes = b""

    def keep(self, frame: bytes) -> None:
        if len(self.messages) >= MAX_MESSAGES:
            return
        if is_stun(frame):
            self.messages.append(frame)
        elif self.data_frames < MAX_DATA_FRAMES:
            self.data_frames += 1
            self.messages.append(frame)


class RecordingProxy:
    """UDP and TCP listeners on 127.0.0.1 that forward to a server and record what clients
    send. One upstream socket per client (address or connection), so the server sees as many
    5-tuples as there are clients. Runs its own event loop on a thread."""

    def __init__(self, server_udp: tuple[str, int] | None, server_tcp: tuple[str, int] | None) -> None:
        self.server_udp = server_udp
        self.server_tcp = server_tcp
        self.sessions: list[_Session] = []
        self.udp_port = 0
        self.tcp_port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._closers: list[Any] = []

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(STEP_TIMEOUT_S)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(STEP_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STEP_TIMEOUT_S)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.server_udp is not None:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpFront(self), local_addr=("127.0.0.1", 0))
            self.udp_port = transport.get_extra_info("sockname")[1]
            self._closers.append(transport)
        if self.server_tcp is not None:
            server = await asyncio.start_server(self._tcp_client, "127.0.0.1", 0)
            self.tcp_port = server.sockets[0].getsockname()[1]
            self._closers.append(server)

    async def _stop(self) -> None:
        for closer in self._closers:
            closer.close()
        await asyncio.sleep(0.1)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.server_tcp is not None
        session = _Session("tcp")
        self.sessions.append(session)
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.server_tcp), 5)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return
        self._closers.append(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            try:
                while data := await src.read(65536):
                    if record:
                        frames, session.leftover = split_stream(session.leftover + data)
                        for frame in frames:
                            session.keep(frame)
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))


class _UdpFront(asyncio.DatagramProtocol):
    def __init__(self, proxy: RecordingProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None
        self.upstreams: dict[tuple[str, int], tuple[asyncio.DatagramTransport, _Session]] = {}
        self.pending: dict[tuple[str, int], list[bytes]] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        entry = self.upstreams.get(addr)
        if entry is None:
            if addr in self.pending:
                self.pending[addr].append(data)
                return
            self.pending[addr] = [data]
            asyncio.ensure_future(self._open(addr))
            return
        upstream, session = entry
        session.keep(data)
        upstream.sendto(data)

    async def _open(self, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        front = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _: Any) -> None:
                if front.transport is not None:
                    front.transport.sendto(data, addr)

        upstream, _ = await loop.create_datagram_endpoint(Back, remote_addr=self.proxy.server_udp)
        self.proxy._closers.append(upstream)
        session = _Session("udp")
        self.proxy.sessions.append(session)
        self.upstreams[addr] = (upstream, session)
        for data in self.pending.pop(addr, []):
            session.keep(data)
            upstream.sendto(data)


# --------------------------------------------------------------------------- the clients


def _version(module: str) -> str:
    try:
        from importlib.metadata import version
        return f"{module} {version(module)}"
    except Exception:
        return module


def _coturn_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "coturn"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return f"coturn {out}" if out else "coturn"
    except (OSError, subprocess.TimeoutExpired):
        return "coturn"


def _aioice(proxy: RecordingProxy, server: Any, transport: str) -> None:
    import aioice.turn

    class Sink(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.received = 0

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.received += 1

    port = proxy.udp_port if transport == "udp" else proxy.tcp_port

    async def call() -> None:
        user, password = server.credentials("aioice")
        # A 3 s lifetime: aioice refreshes at 5/6 of it, so the capture has a Refresh too.
        t1, p1 = await aioice.turn.create_turn_endpoint(Sink, ("127.0.0.1", port), user, password,
                                                        lifetime=3, transport=transport)
        t2, p2 = await aioice.turn.create_turn_endpoint(Sink, ("127.0.0.1", port), user, password,
                                                        lifetime=3, transport=transport)
        r1, r2 = t1.get_extra_info("sockname"), t2.get_extra_info("sockname")
        try:
            started = time.monotonic()
            while time.monotonic() - started < 3.5:
                t1.sendto(b"a" * 100, r2)
                t2.sendto(b"b" * 60, r1)
                await asyncio.sleep(0.1)
            assert p1.received and p2.received, "the aioice call relayed nothing"
        finally:
            t1.close()
            t2.close()
            await asyncio.sleep(0.5)

    asyncio.run(asyncio.wait_for(call(), STEP_TIMEOUT_S))


def _uclient(proxy: RecordingProxy, server: Any, *args: str) -> None:
    port = proxy.tcp_port if "-t" in args else proxy.udp_port
    cmd = ["turnutils_uclient", "-n", "8", "-l", "120", "-z", "50", "-W", server.secret, "-u", "uclient",
           "-p", str(port), *args, "127.0.0.1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    out = result.stdout + result.stderr
    assert "tot_recv_msgs" in out, f"turnutils_uclient failed (exit {result.returncode}):\n{out[-2000:]}"


def _stunclient(proxy: RecordingProxy, server: Any) -> None:
    result = subprocess.run(["turnutils_stunclient", "-p", str(proxy.udp_port), "127.0.0.1"],
                            capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr


RECORDINGS: dict[str, tuple[str, Any]] = {
    # name: (transport, how to run the client)
    "aioice-udp": ("udp", lambda p, s: _aioice(p, s, "udp")),
    "aioice-tcp": ("tcp", lambda p, s: _aioice(p, s, "tcp")),
    "uclient-udp-channels": ("udp", lambda p, s: _uclient(p, s, "-y")),
    "uclient-udp-send": ("udp", lambda p, s: _uclient(p, s, "-y", "-c", "-s")),
    "uclient-tcp-channels": ("tcp", lambda p, s: _uclient(p, s, "-y", "-t")),
    "uclient-tcp-send": ("tcp", lambda p, s: _uclient(p, s, "-y", "-c", "-s", "-t")),
    "stunclient-udp": ("udp", _stunclient),
}
CLIENTS = {"aioice": lambda: _version("aioice"), "uclient": _coturn_version, "stunclient": _coturn_version,
           "chromium": lambda: _chromium_version()}


def _chromium_version() -> str:
    try:
        out = subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "chromium"
    except (OSError, subprocess.TimeoutExpired):
        return "chromium"


def write_capture(name: str, transport: str, sessions: list[_Session], how: str,
                  out: Path = CAPTURE_DIR) -> Path:
    kept = [s.messages for s in sessions if s.messages]
    assert kept, f"{name}: nothing was recorded"
    doc = {
        "format": FORMAT,
        "client": CLIENTS[name.split("-")[0]](),
        "transport": transport,
        "recorded_with": how,
        "sessions": [{"messages": [base64.b64encode(m).decode() for m in s]} for s in kept],
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _start_capture_server(workdir: Path) -> Any:
    from .server import start_server

    return start_server(workdir, listen_tcp=["127.0.0.1:0"], listen_tls=["127.0.0.1:0"],
                        legacy_channel_numbers=True, default_lifetime_s=3, max_lifetime_s=600)


def record(names: list[str], workdir: Path, out: Path = CAPTURE_DIR) -> None:
    for name in names:
        transport, run = RECORDINGS[name]
        server = _start_capture_server(workdir / name)
        try:
            with RecordingProxy(server.address("udp"), server.address("tcp")) as proxy:
                run(proxy, server)
                time.sleep(0.3)
            path = write_capture(name, transport, [s for s in proxy.sessions if s.transport == transport],
                                 f"python3 -m tests.integration.captures record {name}", out)
            print(f"{path}: {sum(len(s.messages) for s in proxy.sessions)} messages")
        finally:
            server.stop()


# --------------------------------------------------------------------------- Chromium


def record_chromium_here(transports: list[str], workdir: Path, out: Path = CAPTURE_DIR) -> None:
    """Inside a network namespace: a call in Chromium through the proxy, per transport."""
    sys.path.insert(0, str(REPO / "tests" / "browser"))
    from run_call import ice_url, run_browser, start_page_server  # noqa: E402 - tests/browser/

    from turnserver.credentials import mint_credentials

    for transport in transports:
        server = _start_capture_server(workdir / f"chromium-{transport}")
        httpd = start_page_server()
        try:
            with RecordingProxy(server.address("udp"), server.address("tcp")) as proxy:
                port = proxy.udp_port if transport == "udp" else proxy.tcp_port
                creds = mint_credentials(server.secret, "chromium", 600)
                ice = [{"urls": [ice_url(transport, port)], "username": creds.username,
                        "credential": creds.password}]
                page = f"http://127.0.0.1:{httpd.server_address[1]}/call.html"
                run_browser(page, ice, workdir / f"chromium-{transport}", 5, 15.0)
                time.sleep(1.0)  # Chromium's Refresh(0) on close
            name = f"chromium-{transport}"
            sessions = [s for s in proxy.sessions if s.transport == transport]
            path = write_capture(name, transport, sessions,
                                 "python3 -m tests.integration.captures record chromium", out)
            print(f"{path}: {sum(len(s.messages) for s in sessions)} messages")
        finally:
            httpd.shutdown()
            httpd.server_close()
            server.stop()


def record_chromium(workdir: Path, out: Path = CAPTURE_DIR) -> None:
    """Chromium ignores loopback-only hosts: run it in a namespace with a veth pair up (both
    ends inside, so nothing leaves it), as tests/browser/ does."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise SystemExit("recording Chromium needs root and iproute2 (ip netns)")
    ns = f"turndcapture{os.getpid()}"

    def ip(*args: str, check: bool = True) -> None:
        subprocess.run(["ip", *args], check=check, capture_output=True, timeout=10)

    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ip("-n", ns, "addr", "add", "10.77.0.1/24", "dev", "v0")
        ip("-n", ns, "link", "set", "v0", "up")
        ip("-n", ns, "link", "set", "v1", "up")
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.integration.captures",
                        "record-chromium-here", "--workdir", str(workdir), "--out", str(out)],
                       cwd=REPO, check=True,
                       timeout=180)
    finally:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout
        for pid in pids.split():
            try:
                os.kill(int(pid), 9)  # only what ran inside our own namespace
            except (ProcessLookupError, ValueError):
                pass
        ip("netns", "del", ns, check=False)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("command", choices=("record", "record-chromium-here"))
    parser.add_argument("names", nargs="*",
                        help=f"of {sorted(RECORDINGS)} or 'chromium' (default: all but chromium)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=CAPTURE_DIR, help="where the capture files go")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="turnd-capture-"))
    if args.command == "record-chromium-here":
        record_chromium_here(["udp", "tcp"], workdir, args.out)
        return 0
    names = args.names or sorted(RECORDINGS)
    if "chromium" in names:
        record_chromium(workdir, args.out)
        names = [n for n in names if n != "chromium"]
    record(names, workdir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
