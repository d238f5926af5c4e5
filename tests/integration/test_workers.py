"""turnd with worker processes (io/supervisor.py, io/worker.py), as ``turnd serve`` runs it.

Each test starts a parent with two workers on loopback. Which worker a client lands on is the
kernel's choice (a hash of its address); the relayed port says which one it was, since each
worker binds relay sockets in its own slice of the range. So the tests find client sockets of
each worker and then show: relaying between workers through the kernel, one nonce good at
every worker, the user quota counted over all workers, the summed metrics, a worker killed
under load replaced on the same sockets while the other worker's call carries on, reload for
all, and the drain.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from turnserver.stun import Attr, Message, MessageClass, Method, encode_message

from .raw_client import RawTurnClient, code
from .server import RunningServer
from .test_metrics import scrape
from .test_soak import wait_until

WORKER_PORTS = (56700, 56763)  # two slices of 32: 56700-56731 and 56732-56763
SLICE = 32
PEER_IP = "127.0.0.1"


def worker_of(port: int) -> int:
    return (port - WORKER_PORTS[0]) // SLICE


def options(**extra: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "workers": 2, "metrics_listen": "127.0.0.1:0", "log_format": "json",
        "relay_port_min": WORKER_PORTS[0], "relay_port_max": WORKER_PORTS[1],
        "allowed_peers": ["127.0.0.1/32"], "user_quota": 0,
    }
    merged.update(extra)
    return merged


def scrape_now(server: RunningServer) -> Any:
    return asyncio.run(scrape(server))


def clients_by_worker(server: RunningServer, user: str = "probe", tries: int = 40
                      ) -> dict[int, list[RawTurnClient]]:
    """Client sockets sorted by the worker the kernel sends them to: each one allocated once
    (to learn it) and deleted again. At least one per worker, or the test fails."""
    found: dict[int, list[RawTurnClient]] = {0: [], 1: []}
    for _ in range(tries):
        client = RawTurnClient(server.address("udp"), *server.credentials(user))
        reply = client.allocate()
        assert code(reply) == 200, reply
        found[worker_of(client.relayed(reply)[1])].append(client)
        assert code(client.request(Method.REFRESH, [(Attr.LIFETIME, 0)])) == 200
        if all(len(v) >= 2 for v in found.values()):
            break
    assert all(found.values()), f"every client landed on one worker: {found}"
    return found


def test_two_workers_each_serve_their_own_slice_and_relay_to_each_other(server_factory) -> None:
    # No allow CIDR: a peer on the relay address is allowed only on a port some worker holds.
    server = server_factory(**options(allowed_peers=[]))
    info = server.info
    assert len(info["workers"]) == 2 and all(info["workers"]) and info["pid"] not in info["workers"]
    by_worker = clients_by_worker(server)
    a, b = by_worker[0][0], by_worker[1][0]
    try:
        ra, rb = a.relayed(a.allocate()), b.relayed(b.allocate())
        assert worker_of(ra[1]) == 0 and worker_of(rb[1]) == 1
        # Allocation to allocation across the two workers, through the kernel.
        assert code(a.bind(0x4001, rb)) == 200
        assert code(b.bind(0x4002, ra)) == 200
        for i in range(20):
            a.send_raw(struct.pack("!HH", 0x4001, 4) + b"a%03d" % i)
            data = b.recv()
            assert data == struct.pack("!HH", 0x4002, 4) + b"a%03d" % i
            b.send_raw(struct.pack("!HH", 0x4002, 4) + b"b%03d" % i)
            assert a.recv() == struct.pack("!HH", 0x4001, 4) + b"b%03d" % i
        now = scrape_now(server)
        assert now.get("turn_worker_allocations", worker="0") == 1
        assert now.get("turn_worker_allocations", worker="1") == 1
        assert now.get("turn_allocations", transport="udp", family="ipv4") == 2
        assert now.get("turn_relayed_packets_total", direction="client_to_peer", transport="udp") == 40
        assert now.get("turn_relayed_packets_total", direction="peer_to_client", transport="udp") == 40
        # B's allocation ends on worker 1 and its port is free: a program that takes it now must
        # get nothing from A's channel on worker 0, which learns of the release through the
        # shared held-port map, not through its own core.
        assert code(b.request(Method.REFRESH, [(Attr.LIFETIME, 0)])) == 200
        squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        squatter.bind(rb)
        squatter.settimeout(0.5)
        try:
            for i in range(5):
                a.send_raw(struct.pack("!HH", 0x4001, 4) + b"x%03d" % i)
            with pytest.raises((socket.timeout, TimeoutError)):
                squatter.recvfrom(2048)
        finally:
            squatter.close()
        dropped = scrape_now(server).get("turn_peer_policy_refusals_total", reason="own_port")
        assert dropped >= 5
    finally:
        for clients in by_worker.values():
            for client in clients:
                client.close()
    server.stop()
    usage = [json.loads(line) for line in server.log_text().splitlines()
             if '"allocation ended"' in line]
    assert usage and all(record["usage"]["worker"] in (0, 1) for record in usage)
    assert {record["worker"] for record in usage} == {0, 1}  # every worker's lines are tagged


def test_a_nonce_from_one_worker_is_good_at_the_other(server_factory) -> None:
    server = server_factory(**options())
    by_worker = clients_by_worker(server)
    first, other = by_worker[0][0], by_worker[1][0]
    try:
        assert first.nonce is not None
        other.nonce = first.nonce  # never challenged by worker 1
        msg = Message(Method.ALLOCATE, MessageClass.REQUEST).add(Attr.REQUESTED_TRANSPORT, 17)
        msg.add(Attr.USERNAME, other.username).add(Attr.REALM, other.realm).add(Attr.NONCE, first.nonce)
        reply = other.transact_raw(encode_message(msg, key=other.key), msg.transaction_id)
        assert reply is not None and code(reply) == 200, reply
        assert worker_of(reply.get(Attr.XOR_RELAYED_ADDRESS)[1]) == 1
    finally:
        for clients in by_worker.values():
            for client in clients:
                client.close()


def test_the_user_quota_counts_over_every_worker(server_factory) -> None:
    server = server_factory(**options(user_quota=2))
    by_worker = clients_by_worker(server)
    assert len(by_worker[0]) >= 2 or len(by_worker[1]) >= 2
    many, few = (0, 1) if len(by_worker[0]) >= 2 else (1, 0)
    clients = [by_worker[many][0], by_worker[many][1], by_worker[few][0]]
    user = server.credentials("quota-user")
    try:
        for client in clients:
            client.username, client.password = user
            client.nonce = None
        assert code(clients[0].allocate()) == 200
        assert code(clients[1].allocate()) == 200
        # The third is on the other worker, which holds nothing for this user itself.
        assert code(clients[2].allocate()) == 486
        now = scrape_now(server)
        assert now.get("turn_limit_refusals_total", limit="user_quota") == 1
        assert code(clients[0].request(Method.REFRESH, [(Attr.LIFETIME, 0)])) == 200
        assert code(clients[2].allocate()) == 200  # a slot came back, on the other worker
    finally:
        for group in by_worker.values():
            for client in group:
                client.close()


def test_a_killed_worker_is_replaced_on_the_same_sockets_and_the_other_keeps_relaying(
        server_factory) -> None:
    server = server_factory(**options())
    by_worker = clients_by_worker(server)
    survivor, victim_client = by_worker[0][0], by_worker[1][0]
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((PEER_IP, 0))
    peer.settimeout(2.0)
    pids = server.info["workers"]
    try:
        relayed = survivor.relayed(survivor.allocate())
        assert code(survivor.bind(0x4001, peer.getsockname())) == 200
        assert code(victim_client.allocate()) == 200
        before = scrape_now(server)
        created_before = before.get("turn_allocations_created_total", transport="udp", family="ipv4")
        # A steady call on worker 0: 400 round trips, worker 1 killed a quarter of the way in.
        lost = 0
        killed_at = None
        for i in range(400):
            if i == 100:
                os.kill(pids[1], signal.SIGKILL)
                killed_at = time.monotonic()
            survivor.send_raw(struct.pack("!HH", 0x4001, 6) + b"c%05d" % i)
            try:
                data, addr = peer.recvfrom(2048)
            except (socket.timeout, TimeoutError):
                lost += 1
                continue
            assert data == b"c%05d" % i and addr == relayed
            peer.sendto(b"p%05d" % i, relayed)
            if survivor.recv(2.0) != struct.pack("!HH", 0x4001, 6) + b"p%05d" % i:
                lost += 1
            time.sleep(0.002)
        assert lost == 0, f"{lost} of 400 round trips lost on the surviving worker"
        assert killed_at is not None
        # A new worker serves on the dead one's sockets within a second: its old client is
        # answered again (its allocation is gone: it must allocate anew).
        def served() -> bool:
            reply = victim_client.binding()
            return reply is not None and reply.msg_class == MessageClass.SUCCESS
        assert wait_until(served, 5.0)
        replaced_after = time.monotonic() - killed_at
        assert replaced_after < 3.0
        victim_client.nonce = None
        reply = victim_client.request(Method.REFRESH, [(Attr.LIFETIME, 600)])
        assert code(reply) == 437  # no allocation on the new worker: what such a client sees
        assert code(victim_client.allocate()) == 200
        def ready_names_the_new_worker() -> bool:
            # The parent rewrites the ready file once the new worker says it is ready, which
            # can be just after that worker first answers.
            info = json.loads(Path(server.workdir / "ready.json").read_text())
            return info["workers"][0] == pids[0] and info["workers"][1] not in (None, pids[1])
        assert wait_until(ready_names_the_new_worker, 5.0)
        after = scrape_now(server)
        # Counters of the dead worker are kept: nothing goes backwards.
        assert after.get("turn_allocations_created_total", transport="udp", family="ipv4") >= created_before + 1
        assert after.get("turn_worker_allocations", worker="0") == 1
        assert after.get("turn_worker_allocations", worker="1") == 1
        assert "worker 1 (pid" in server.log_text() and "SIGKILL" in server.log_text()
    finally:
        peer.close()
        for group in by_worker.values():
            for client in group:
                client.close()


def test_reload_reaches_every_worker_or_none(server_factory) -> None:
    server = server_factory(**options(user_quota=0))
    by_worker = clients_by_worker(server)
    try:
        config = server.workdir / "turnd.toml"
        text = config.read_text()
        config.write_text(text.replace("user_quota = 0", "user_quota = 1"))
        server.signal(signal.SIGHUP)
        assert wait_until(lambda: "reload applied by 2 of 2 workers" in server.log_text(), 10.0)
        user = server.credentials("reloaded-user")
        for w in (0, 1):
            for client in by_worker[w]:
                client.username, client.password = user
                client.nonce = None
        assert code(by_worker[0][0].allocate()) == 200
        assert code(by_worker[1][0].allocate()) == 486  # the new quota, over both workers
        # A configuration with a problem is refused for all.
        config.write_text(text.replace("user_quota = 0", "user_quota = -5"))
        server.signal(signal.SIGHUP)
        assert wait_until(lambda: "reload refused for every worker" in server.log_text(), 10.0)
        assert code(by_worker[1][0].allocate()) == 486  # still user_quota = 1
    finally:
        for group in by_worker.values():
            for client in group:
                client.close()


def test_sigterm_drains_every_worker_and_the_parent_exits_when_they_have(server_factory) -> None:
    server = server_factory(**options(drain_timeout_s=30))
    by_worker = clients_by_worker(server)
    held = [by_worker[0][0], by_worker[1][0]]
    try:
        for client in held:
            assert code(client.allocate()) == 200
        server.signal(signal.SIGTERM)
        assert wait_until(lambda: server.log_text().count("draining") >= 2, 5.0)
        # New allocations are refused by both workers; the held ones keep working.
        for w in (0, 1):
            fresh = by_worker[w][1] if len(by_worker[w]) > 1 else None
            if fresh is not None:
                assert code(fresh.allocate()) == 508
        assert code(held[0].request(Method.REFRESH, [(Attr.LIFETIME, 600)])) == 200
        assert server.alive()
        # Worker 0's last allocation ends: it has drained, but the service has not, so a new
        # client that lands on it is still answered 508, not met with silence.
        assert code(held[0].request(Method.REFRESH, [(Attr.LIFETIME, 0)])) == 200
        assert wait_until(lambda: "every worker has drained" not in server.log_text(), 0.5)
        if len(by_worker[0]) > 1:
            late = by_worker[0][1]
            late.nonce = None
            assert code(late.allocate()) == 508
        assert server.alive()
        assert code(held[1].request(Method.REFRESH, [(Attr.LIFETIME, 0)])) == 200
        assert server.proc.wait(timeout=10) == 0
        assert "every worker has drained" in server.log_text()
    finally:
        for group in by_worker.values():
            for client in group:
                client.close()


def test_only_the_parent_talks_to_systemd(tmp_path: Path) -> None:
    """READY=1, WATCHDOG=1 and STOPPING=1 come from the parent's pid (the kernel says who sent
    each datagram, SO_PASSCRED); the workers never see NOTIFY_SOCKET."""
    from .server import start_server

    name = f"turnd-test-{os.getpid()}-{os.urandom(4).hex()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(b"\0" + name.encode())
    server = start_server(tmp_path / "turnd", env={"NOTIFY_SOCKET": "@" + name,
                                                   "WATCHDOG_USEC": "400000"}, **options())
    senders: dict[str, set[int]] = {}
    try:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and len(senders.get("WATCHDOG", ())) == 0:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (socket.timeout, TimeoutError):
                break
            pid = next(struct.unpack("iii", d[:12])[0] for level, kind, d in ancillary
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            for line in data.decode().split("\n"):
                senders.setdefault(line.split("=", 1)[0], set()).add(pid)
        assert senders.get("READY") == {server.proc.pid}, senders
        assert senders.get("WATCHDOG") == {server.proc.pid}, senders
        for pid in server.info["workers"]:
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert b"NOTIFY_SOCKET=" not in f.read()
    finally:
        server.stop()
        sock.close()


def test_every_worker_serves_the_same_self_signed_certificate(server_factory) -> None:
    """Without tls_cert_file the parent makes one certificate for all its workers, so a
    client sees the same one whichever worker the kernel gives it."""
    import ssl

    server = server_factory(**options(listen_tls=["127.0.0.1:0"]))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    seen = set()
    for _ in range(12):  # twelve source ports: both workers, all but surely
        with socket.create_connection(("127.0.0.1", server.port("tls")), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                seen.add(tls.getpeercert(binary_form=True))
    assert len(seen) == 1
    assert server.log_text().count("serving a self-signed certificate") == 2  # one per worker
