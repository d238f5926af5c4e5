"""The parent of the worker processes: it holds every socket, relays nothing itself.

``turnd serve`` with ``workers`` above 1 runs this. The parent

* binds every listener once per worker, each socket with SO_REUSEPORT (UDP, TCP and TLS alike),
  so the kernel spreads clients over the workers by a hash of their address;
* creates the shared memory (io/shared.py: the quota ledger and the held-port map) and the
  nonce key all workers use, so a nonce from one worker is good at every other;
* starts each worker (``python -m turnserver.io.worker``) with its sockets, its slice of the
  relay port range and its share of ``server_bandwidth_bytes_s``, and replaces one that dies
  on the same sockets: the parent keeps them open, so the kernel's reuseport group does not
  change and the other workers' clients keep reaching their own worker;
* serves the one ``/metrics`` endpoint (the sum of the workers' snapshots; a worker that died
  keeps what it counted), answers SIGHUP (re-read, check, and hand the new configuration to
  every worker, or refuse it for all), SIGTERM (every worker drains; the parent exits when all
  have finished) and SIGINT (stop now), and alone talks to systemd.

Parent and worker speak newline-delimited JSON over a socketpair (``send`` and ``Channel``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from .. import __version__
from ..config import Config, ConfigError, format_hostport, parse_hostport
from ..snapshot import CounterKeeper, ServerSnapshot
from .relay import detect_relay_addresses
from .sdnotify import SystemdNotifier
from .server import bind_udp, write_ready_file
from .shared import SharedMemory
from .stream import LISTEN_BACKLOG, bind_tcp

log = logging.getLogger("turnd")

MIN_SLICE_PORTS = 16
# A worker that dies this soon after it started is restarted after a pause that doubles up to
# RESTART_BACKOFF_MAX_S, so a worker that cannot start does not spin.
QUICK_DEATH_S = 2.0
RESTART_BACKOFF_MAX_S = 10.0
START_TIMEOUT_S = 30.0
SNAPSHOT_TIMEOUT_S = 2.0
POLL_S = 0.1


def resolve_workers(config: Config) -> int:
    """``workers``, with 0 meaning one per CPU the process may use."""
    if config.workers:
        return config.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def port_slices(low: int, high: int, count: int) -> list[tuple[int, int]]:
    """The relay port range cut into ``count`` consecutive slices, the last taking the rest."""
    size = (high - low + 1) // count
    slices = [(low + i * size, low + (i + 1) * size - 1) for i in range(count)]
    slices[-1] = (slices[-1][0], high)
    return slices


def worker_config(config: Config, count: int, relay_addresses: list[str]) -> Config:
    """A worker's configuration: the parent's, with what is shared out made explicit (its
    relay addresses, its share of the server's bandwidth); the parent serves the metrics."""
    share = math.ceil(config.server_bandwidth_bytes_s / count) if config.server_bandwidth_bytes_s else 0
    return dataclasses.replace(config, relay_addresses=tuple(relay_addresses), metrics_listen="",
                               server_bandwidth_bytes_s=share)


def config_to_json(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_json(data: dict[str, Any]) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields})


def users_to_json(users: dict[str, str | bytes]) -> dict[str, list[str]]:
    return {name: (["b", value.hex()] if isinstance(value, bytes) else ["s", value])
            for name, value in users.items()}


def users_from_json(data: dict[str, list[str]]) -> dict[str, str | bytes]:
    return {name: (bytes.fromhex(v) if kind == "b" else v) for name, (kind, v) in data.items()}


def encode_line(message: dict[str, Any]) -> bytes:
    """One control message as its line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """One message, blocking (small, on a local socketpair)."""
    sock.sendall(encode_line(message))


class Channel:
    """The parent's side of one worker's control socket: requests and their answers."""

    def __init__(self, sock: socket.socket, on_message: Any = None) -> None:
        self.sock = sock
        self.on_message = on_message  # for messages nobody asked for ("drained")
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._waiting: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(sock=self.sock, limit=64 * 1024 * 1024)
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.reader is not None
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                waiting = self._waiting.get(message.get("type", ""))
                if waiting:
                    future = waiting.pop(0)
                    if not future.done():
                        future.set_result(message)
                elif self.on_message is not None:
                    self.on_message(message)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed.set()
            for futures in self._waiting.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(ConnectionError("worker gone"))

    def post(self, message: dict[str, Any]) -> None:
        if self.writer is not None and not self.closed.is_set():
            try:
                self.writer.write(encode_line(message))
            except (ConnectionError, OSError, RuntimeError):
                pass

    async def ask(self, message: dict[str, Any], answer: str, timeout_s: float) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(answer, []).append(future)
        self.post(message)
        return await asyncio.wait_for(future, timeout_s)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        else:
            self.sock.close()
        if self._task is not None:
            self._task.cancel()


@dataclasses.dataclass
class WorkerSlot:
    index: int
    sockets: list[tuple[str, socket.socket]]
    port_slice: tuple[int, int]
    proc: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    started_at: float = 0.0
    ready: bool = False
    restarts: int = 0
    backoff_s: float = 0.0
    drained: bool = False
    handoff: socket.socket | None = None


class Supervisor:
    def __init__(self, config: Config, *, secrets: list[bytes], static_users: dict[str, Any],
                 workers: int, ready_file: str | None, reload_settings: Any,
                 generated_secret: bool, config_path: str | None,
                 notifier: SystemdNotifier | None = None) -> None:
        self.config = config
        self.secrets = list(secrets)
        self.static_users = dict(static_users)
        self.count = workers
        self.ready_file = ready_file
        self.reload_settings = reload_settings
        self.generated_secret = generated_secret
        self.config_path = config_path
        self.notifier = notifier or SystemdNotifier()
        self.relay_addresses: list[str] = []
        self.listeners: list[tuple[str, tuple[str, int]]] = []
        self.slots: list[WorkerSlot] = []
        self.keeper = CounterKeeper()
        self.memory: SharedMemory | None = None
        self.nonce_key = os.urandom(32)
        self.self_signed: tuple[bytes, bytes] | None = None
        self.stopping: str | None = None  # "drain" or "stop" once asked
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.observability: Any = None
        self._refreshing: asyncio.Task[None] | None = None
        self.generation = 0  # reloads applied (turnd admin status)
        self.started = time.time()
        self.admin: Any = None
        from .admin import RateMeter

        self.meter = RateMeter()

    # ------------------------------------------------------------------ sockets

    def bind_all(self) -> None:
        """Every listener, once per worker, as SO_REUSEPORT groups; port 0 is resolved by the
        first socket of a group and the rest join it."""
        from ..addresses import canonical_ip

        config = self.config
        self.relay_addresses = [canonical_ip(a.strip(), keep_mapped=True)
                                for a in config.relay_addresses] or detect_relay_addresses()
        per_worker: list[list[tuple[str, socket.socket]]] = [[] for _ in range(self.count)]
        try:
            for transport, specs in (("udp", config.listen_udp), ("tcp", config.listen_tcp),
                                     ("tls", config.listen_tls)):
                for spec in specs:
                    host, port = parse_hostport(spec, f"listen_{transport}")
                    bound_port = port
                    for i in range(self.count):
                        if transport == "udp":
                            sock = bind_udp(host, bound_port, reuse_port=True)
                        else:
                            sock = bind_tcp(host, bound_port, reuse_port=True)
                            sock.listen(LISTEN_BACKLOG)
                        sock.set_inheritable(True)
                        bound = sock.getsockname()
                        bound_port = bound[1]
                        per_worker[i].append((transport, sock))
                    self.listeners.append((transport, (host if host else bound[0], bound_port)))
        except BaseException:
            for group in per_worker:
                for _, sock in group:
                    sock.close()
            raise
        slices = port_slices(config.relay_port_min, config.relay_port_max, self.count)
        self.slots = [WorkerSlot(i, per_worker[i], slices[i]) for i in range(self.count)]
        held = max(hi - lo + 1 for lo, hi in slices) * max(1, len(self.relay_addresses))
        self.memory = SharedMemory.create(self.count, held, max(1, len(self.relay_addresses)))
        if config.listen_tls and not (config.tls_cert_file or config.tls_key_file):
            # One self-signed certificate for every worker (and every replacement), so a
            # client sees the same one whichever worker it lands on.
            from .tls import certificate_names, make_self_signed

            self.self_signed = make_self_signed(certificate_names(config, self.relay_addresses))

    # ------------------------------------------------------------------ workers

    def _start_message(self, slot: WorkerSlot, config: Config, secrets: list[bytes],
                       static_users: dict[str, Any]) -> dict[str, Any]:
        assert self.memory is not None
        parent_listening = []
        if self.observability is not None:
            parent_listening = [[e["host"], e["port"]] for e in self.observability.ready_entries()]
        return {
            "type": "start", "index": slot.index, "count": self.count,
            "config": config_to_json(worker_config(config, self.count, self.relay_addresses)),
            "secrets": [s.hex() for s in secrets], "static_users": users_to_json(static_users),
            "nonce_key": self.nonce_key.hex(), "slice": list(slot.port_slice),
            "listeners": [[transport, sock.fileno()] for transport, sock in slot.sockets],
            "shared": self.memory.describe(), "relay_addresses": self.relay_addresses,
            "parent_listening": parent_listening,
            "self_signed": ([p.decode("ascii") for p in self.self_signed]
                            if self.self_signed is not None else None),
        }

    async def spawn(self, slot: WorkerSlot) -> None:
        assert self.memory is not None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_end.set_inheritable(True)
        # RFC 6062 data connections that reach the wrong worker go through here (io/handoff.py).
        hand_parent, hand_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        hand_child.set_inheritable(True)
        self._close_handoff(slot)
        slot.handoff = hand_parent
        hand_parent.setblocking(False)
        asyncio.get_running_loop().add_reader(hand_parent.fileno(), self._route_handoff, slot)
        fds = [sock.fileno() for _, sock in slot.sockets] + [self.memory.fd, child_end.fileno(),
                                                             hand_child.fileno()]
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        try:
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "turnserver.io.worker", str(child_end.fileno())],
                pass_fds=fds, env=env, close_fds=True,
            )
        finally:
            child_end.close()
        slot.started_at = time.monotonic()
        start = self._start_message(slot, self.config, self.secrets, self.static_users)
        start["handoff"] = hand_child.fileno()
        slot.ready = False
        parent_end.setblocking(True)
        try:
            send(parent_end, start)
        finally:
            hand_child.close()
        parent_end.setblocking(False)
        slot.drained = False
        slot.channel = Channel(parent_end, on_message=lambda m, s=slot: self._on_worker_message(s, m))
        await slot.channel.open()

    def _route_handoff(self, slot: WorkerSlot) -> None:
        """Forward what a worker hands over to the worker its header names; a connection for
        a worker that is not running is closed (its client's connection ends)."""
        sock = slot.handoff
        if sock is None:
            return
        for _ in range(32):
            try:
                message, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close_handoff(slot)
                return
            if not message and not fds:
                self._close_handoff(slot)  # the worker is gone
                return
            try:
                target = int(json.loads(message)["to"])
                to = self.slots[target].handoff if 0 <= target < len(self.slots) else None
                if to is not None and fds:
                    socket.send_fds(to, [message], fds[:1])
            except (ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("a connection handed over by worker %d was dropped: %s", slot.index, exc)
            finally:
                for fd in fds:
                    os.close(fd)

    def _close_handoff(self, slot: WorkerSlot) -> None:
        sock, slot.handoff = slot.handoff, None
        if sock is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(sock.fileno())
        except (OSError, ValueError, RuntimeError):
            pass
        sock.close()

    def _on_worker_message(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        if message.get("type") == "drained":
            slot.drained = True
            if self.stopping == "drain" and all(s.drained or s.proc is None for s in self.slots):
                log.info("every worker has drained")
                self.request_stop()

    async def wait_ready(self, slot: WorkerSlot, timeout_s: float = START_TIMEOUT_S) -> bool:
        assert slot.channel is not None
        try:
            await slot.channel.ask({"type": "hello"}, "ready", timeout_s)
        except (asyncio.TimeoutError, ConnectionError):
            return False
        slot.ready = True
        return True

    async def _watch(self) -> None:
        """Replace a worker that died (unless the parent is stopping)."""
        while not self._stop.is_set():
            await asyncio.sleep(POLL_S)
            for slot in self.slots:
                proc = slot.proc
                if proc is None or proc.poll() is None:
                    continue
                code = proc.returncode
                slot.proc = None
                if slot.channel is not None:
                    slot.channel.close()
                    slot.channel = None
                self.keeper.worker_exited(slot.index)
                assert self.memory is not None
                # What it held went with it (its relay sockets closed with the process).
                self.memory.clear_worker(slot.index, slot.port_slice)
                if self.stopping is not None:
                    continue
                lived = time.monotonic() - slot.started_at
                slot.backoff_s = (min(RESTART_BACKOFF_MAX_S, max(0.5, slot.backoff_s * 2))
                                  if lived < QUICK_DEATH_S else 0.0)
                log.error("worker %d (pid %d) exited with %s after %.1f s; its allocations are "
                          "lost; starting a new one on the same sockets%s", slot.index, proc.pid,
                          _exit_text(code), lived,
                          f" in {slot.backoff_s:g} s" if slot.backoff_s else "")
                slot.restarts += 1
                asyncio.get_running_loop().create_task(self._respawn(slot))
            if self.stopping is not None and all(s.proc is None for s in self.slots):
                self._stop.set()

    async def _respawn(self, slot: WorkerSlot) -> None:
        if slot.backoff_s:
            await asyncio.sleep(slot.backoff_s)
        if self.stopping is not None:
            return
        try:
            await self.spawn(slot)
        except OSError as exc:
            log.error("worker %d could not be started: %s", slot.index, exc)
            return
        if await self.wait_ready(slot):
            log.info("worker %d (pid %d) serving", slot.index, slot.proc.pid if slot.proc else 0)
            self._write_ready_file()

    # ------------------------------------------------------------------ metrics

    def snapshots(self) -> list[ServerSnapshot]:
        return self.keeper.snapshots()

    async def refresh_snapshots(self) -> None:
        """Ask every worker for its snapshot (a scrape waits for this, briefly)."""
        if self._refreshing is not None and not self._refreshing.done():
            await asyncio.shield(self._refreshing)
            return
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        async def one(slot: WorkerSlot) -> None:
            if slot.channel is None or not slot.ready:
                return
            try:
                answer = await slot.channel.ask({"type": "snapshot"}, "snapshot", SNAPSHOT_TIMEOUT_S)
            except (asyncio.TimeoutError, ConnectionError):
                return
            self.keeper.update(ServerSnapshot.from_dict(answer["snapshot"]))

        await asyncio.gather(*(one(slot) for slot in self.slots))

    def allocation_count(self) -> int:
        """Allocations alive over all workers, as of the last snapshots."""
        return sum(sum(s.allocations.values()) for s in self.keeper.snapshots())

    # ------------------------------------------------------------------ signals

    def request_stop(self) -> None:
        if self.stopping == "stop":
            return
        self.stopping = "stop"
        self.notifier.stopping("stopping")
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.post({"type": "stop"})
            elif slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGINT)

    def request_drain(self) -> None:
        if self.stopping is not None:
            self.request_stop()  # a second SIGTERM: stop at once
            return
        self.stopping = "drain"
        log.info("SIGTERM: every worker drains (new allocations are refused); send SIGTERM "
                 "again to stop at once")
        self.notifier.stopping("draining")
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.post({"type": "drain"})

    def request_reload(self) -> None:
        if self.stopping is not None:
            log.warning("SIGHUP while stopping: not reloading")
            return
        asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                await self._apply_reload()
            except Exception:
                log.exception("reload failed; every worker keeps the previous configuration")
            finally:
                self.notifier.ready("reloaded")

    async def _apply_reload(self) -> None:
        from .run import reload_credentials

        if self.reload_settings is None:
            log.warning("SIGHUP: this server was not started from a configuration; nothing to reload")
            return
        log.info("SIGHUP: reloading the configuration for %d workers", self.count)
        try:
            settings = self.reload_settings()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload: %s", problem)
            log.error("reload refused for every worker: %d problem(s) in the new configuration; "
                      "still running on the previous one", len(exc.problems))
            return
        secrets, users = reload_credentials(settings, self.secrets, self.static_users,
                                            self.generated_secret)
        config = settings.config
        answers = []
        for slot in self.slots:
            if slot.channel is None:
                continue
            message = {"type": "reload",
                       "config": config_to_json(worker_config(config, self.count, self.relay_addresses)),
                       "secrets": [s.hex() for s in secrets], "static_users": users_to_json(users)}
            try:
                answers.append(await slot.channel.ask(message, "reloaded", 30.0))
            except (asyncio.TimeoutError, ConnectionError):
                log.error("reload: worker %d did not answer", slot.index)
        # What a worker started later gets: the configuration now in force.
        from ..config import reload_plan

        _, restart = reload_plan(self.config, config)
        old = self.config
        self.config = dataclasses.replace(config, **{name: getattr(self.config, name) for name in restart})
        self.secrets, self.static_users = list(secrets), dict(users)
        applied = answers[0].get("applied", []) if answers else []
        self.generation += 1
        log.info("reload applied by %d of %d workers: %s; %d shared secret(s), %d static user(s)",
                 len(answers), self.count,
                 ("changed " + ", ".join(applied)) if applied else "no option changed",
                 len(secrets), len(users))
        if restart:
            log.warning("reload: %s changed but needs a restart; the running values stay in force "
                        "until then", ", ".join(restart))
        if (old.log_level, old.log_format) != (config.log_level, config.log_format):
            from ..logs import setup_logging

            setup_logging(config.log_level, config.log_format)

    # ------------------------------------------------------------------ turnd admin

    async def ask_workers(self, request: dict[str, Any], timeout_s: float = 1.0
                          ) -> tuple[list[dict[str, Any]], list[int]]:
        """Every worker's answer to an admin request, and the workers that gave none in time
        (reported, never silently left out)."""
        async def one(slot: WorkerSlot) -> dict[str, Any] | None:
            if slot.channel is None or not slot.ready:
                return None
            try:
                return await slot.channel.ask({"type": "admin", "request": request}, "admin-answer",
                                              timeout_s)
            except (asyncio.TimeoutError, ConnectionError):
                return None

        answers = await asyncio.gather(*(one(slot) for slot in self.slots))
        missing = [slot.index for slot, answer in zip(self.slots, answers) if answer is None]
        return [a for a in answers if a is not None], missing

    async def admin_handle(self, request: dict[str, Any]) -> dict[str, Any]:
        from .admin import AdminError, check_disconnect, client_filter, set_log_level

        command = request["command"]
        if command in ("sessions", "disconnect"):
            if command == "disconnect":
                check_disconnect(request)
            client_filter(request.get("client"))  # a bad CIDR is refused before any worker
            answers, missing = await self.ask_workers(request)
            errors = [a["error"] for a in answers if "error" in a]
            if errors:
                raise AdminError(errors[0])
            if command == "sessions":
                sessions = [record for a in answers for record in a.get("sessions", [])]
                return {"sessions": sessions, "workers_missing": missing}
            return {"disconnected": sum(a.get("disconnected", 0) for a in answers),
                    "workers_missing": missing}
        if command == "status":
            answers, missing = await self.ask_workers(request)
            await self.refresh_snapshots()
            from .admin import relayed_bytes
            from ..snapshot import merge

            total = merge(self.snapshots()) if self.snapshots() else None
            return {"version": __version__, "uptime_s": round(time.time() - self.started, 1),
                    "workers": self.count, "workers_answering": len(answers),
                    "workers_missing": missing,
                    "allocations": sum(a.get("allocations", 0) for a in answers),
                    "relayed_bit_rate": round(self.meter.rate(relayed_bytes(total))) if total else 0,
                    "draining": self.stopping == "drain", "generation": self.generation}
        if command == "reload":
            before = self.generation
            await self._reload()
            return {"applied": self.generation > before, "generation": self.generation}
        if command == "drain":
            self.request_drain()
            return {"draining": True}
        if command == "loglevel":
            level = set_log_level(request.get("level"))
            answers, missing = await self.ask_workers(request)
            return {"level": level, "workers_missing": missing}
        raise AdminError(f"unknown command {command!r}: status, sessions, disconnect, reload, "
                         "drain or loglevel")

    # ------------------------------------------------------------------ running

    def ready_info(self) -> dict[str, Any]:
        entries = [{"transport": t, "host": a[0], "port": a[1]} for t, a in self.listeners]
        if self.observability is not None:
            entries += self.observability.ready_entries()
        return {"pid": os.getpid(), "listeners": entries, "relay_addresses": self.relay_addresses,
                "workers": [slot.proc.pid if slot.proc is not None else None for slot in self.slots]}

    def _write_ready_file(self) -> None:
        if self.ready_file:
            write_ready_file(self.ready_file, self.ready_info())

    async def run(self) -> int:
        from ..metrics import Observability

        loop = asyncio.get_running_loop()
        try:
            self.bind_all()
        except OSError as exc:
            log.error("cannot start: %s", exc.strerror or exc)
            self.notifier.status(f"cannot start: {exc.strerror or exc}")
            return 1
        for lo, hi in (slot.port_slice for slot in self.slots):
            if hi - lo + 1 < MIN_SLICE_PORTS:
                log.error("cannot start: relay_port_min..relay_port_max gives worker processes "
                          "fewer than %d ports each with workers = %d: widen the range or lower "
                          "workers", MIN_SLICE_PORTS, self.count)
                self._close()
                return 1
        # Each worker logs its own trouble summary (tagged with its id); the parent serves the sum.
        self.observability = Observability(snapshot_source=self.snapshots,
                                           metrics_listen=self.config.metrics_listen,
                                           refresh=self.refresh_snapshots, trouble=False)
        handlers = {signal.SIGHUP: self.request_reload, signal.SIGTERM: self.request_drain,
                    signal.SIGINT: self.request_stop}
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
        watcher: asyncio.Task[None] | None = None
        housekeeping: asyncio.Task[None] | None = None
        try:
            try:
                await self.observability.start()
            except OSError as exc:
                log.error("cannot start: %s", exc.strerror or exc)
                return 1
            for slot in self.slots:
                await self.spawn(slot)
            ready = await asyncio.gather(*(self.wait_ready(slot) for slot in self.slots))
            if not all(ready):
                log.error("cannot start: %d of %d workers did not start", ready.count(False), self.count)
                self.request_stop()
                await self._wait_exit(10.0)
                return 1
            await self.refresh_snapshots()
            watcher = loop.create_task(self._watch())
            from .run import start_admin

            self.admin = await start_admin(self.config.admin_socket, self.admin_handle)
            self._write_ready_file()
            log.info("turnd %s started: configuration %s; %d workers (pids %s); listening %s; "
                     "relaying on %s, ports %d-%d", __version__,
                     self.config_path or "none (built-in defaults, environment and flags)",
                     self.count, ", ".join(str(s.proc.pid) for s in self.slots if s.proc),
                     ", ".join(f"{t} {format_hostport(*a)}" for t, a in self.listeners) or "nowhere",
                     ", ".join(self.relay_addresses), self.config.relay_port_min,
                     self.config.relay_port_max)
            self.notifier.ready(f"{self.count} workers")
            if self.notifier.enabled:
                housekeeping = loop.create_task(self._housekeeping())
            await self._stop.wait()
            log.info("every worker has exited; stopping")
        finally:
            for sig in handlers:
                loop.remove_signal_handler(sig)
            for task in (watcher, housekeeping):
                if task is not None:
                    task.cancel()
            if self.stopping is None:
                self.request_stop()
            await self._wait_exit(15.0)
            if self.admin is not None:
                await self.admin.stop()
            await self.observability.stop()
            self._close()
        return 0

    async def _housekeeping(self) -> None:
        """WATCHDOG=1 from the parent's loop, and STATUS= with the allocations of all workers."""
        watchdog_s = self.notifier.watchdog_interval_s()
        interval = 5.0 if watchdog_s is None else min(5.0, watchdog_s)
        last = None
        while True:
            await asyncio.sleep(interval)
            if watchdog_s is not None:
                self.notifier.watchdog()
            try:
                await self.refresh_snapshots()
            except Exception:
                continue
            count = self.allocation_count()
            text = f"{self.count} workers, {count} allocation{'' if count == 1 else 's'}"
            if self.stopping == "drain":
                text = f"draining, {count} allocation{'' if count == 1 else 's'} left"
            if text != last:
                last = text
                self.notifier.status(text)

    async def _wait_exit(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(s.proc is None or s.proc.poll() is not None for s in self.slots):
                return
            await asyncio.sleep(POLL_S)
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                log.warning("worker %d did not exit; killing it", slot.index)
                slot.proc.kill()
                slot.proc.wait(5)

    def _close(self) -> None:
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.close()
            for _, sock in slot.sockets:
                sock.close()
        if self.memory is not None:
            self.memory.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def run_supervisor(config: Config, *, secrets: list[bytes], static_users: dict[str, Any],
                   workers: int, ready_file: str | None = None, reload_settings: Any = None,
                   generated_secret: bool = False, config_path: str | None = None) -> int:
    from .run import new_event_loop

    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        supervisor = Supervisor(config, secrets=secrets, static_users=static_users, workers=workers,
                                ready_file=ready_file, reload_settings=reload_settings,
                                generated_secret=generated_secret, config_path=config_path)
        return loop.run_until_complete(supervisor.run())
    finally:
        loop.close()
