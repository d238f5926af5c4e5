"""The state worker processes share (turnserver/io/shared.py): the quota ledger and the
held-port map, over one shared memory file, checked with several ledgers on one file and with
real processes taking slots at the same time."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from turnserver.io.shared import HeldPorts, SharedLedger, SharedMemory
from turnserver.turn.limits import QuotaLedger

KEY = b"k" * 32


@pytest.fixture
def memory():
    mem = SharedMemory.create(3, 64, 2)
    yield mem
    mem.close()
    os.close(mem.fd)


def test_the_local_and_the_shared_ledger_agree(memory) -> None:
    local = QuotaLedger()
    shared = SharedLedger(memory, 0, KEY)
    for ledger in (local, shared):
        assert ledger.acquire("alice", 1, 0, 0, 2, 3) is None
        assert ledger.acquire("alice", 1, 0, 0, 2, 3) is None
        assert ledger.acquire("alice", 1, 0, 0, 2, 3) == "user_quota"
        assert ledger.acquire("alice", 1, 1, 1, 2, 3) is None  # a reservation handed over
        assert ledger.acquire("bob", 2, 0, 0, 2, 3) == "max_allocations"
        assert ledger.acquire("bob", 1, 0, 0, 0, 0) is None  # both limits off
        assert (ledger.user_count("alice"), ledger.user_count("bob"), ledger.total()) == (3, 1, 4)
        ledger.release("alice", 3)
        ledger.release("bob")
        ledger.release("bob")  # more than held: stays at zero
        assert (ledger.user_count("alice"), ledger.user_count("bob"), ledger.total()) == (0, 0, 0)


def test_quotas_count_over_every_worker_and_a_dead_worker_is_forgotten(memory) -> None:
    workers = [SharedLedger(memory, i, KEY) for i in range(3)]
    assert workers[0].acquire("alice", 1, 0, 0, 2, 4) is None
    assert workers[1].acquire("alice", 1, 0, 0, 2, 4) is None
    assert workers[2].acquire("alice", 1, 0, 0, 2, 4) == "user_quota"
    assert workers[2].acquire("bob", 2, 0, 0, 2, 4) is None
    assert workers[0].acquire("carol", 1, 0, 0, 2, 4) == "max_allocations"
    assert workers[2].user_count("alice") == 2 and workers[0].total() == 4
    memory.clear_worker(1)
    assert workers[2].user_count("alice") == 1 and workers[2].total() == 3
    assert workers[2].acquire("alice", 1, 0, 0, 2, 4) is None


def test_a_table_churned_by_many_users_keeps_exact_counts(memory) -> None:
    """Users come and go far beyond the table's size: tombstones are rebuilt away and counts
    stay exact."""
    ledger = SharedLedger(memory, 0, KEY)
    other = SharedLedger(memory, 1, KEY)
    assert other.acquire("steady", 3, 0, 0, 0, 0) is None
    held = {}
    for n in range(5000):
        user = f"user{n}"
        assert ledger.acquire(user, 1, 0, 0, 0, 0) is None
        held[user] = 1
        if len(held) > 40:  # never more than the table was sized for
            gone = next(iter(held))
            ledger.release(gone)
            del held[gone]
    assert ledger.total() == 3 + len(held)
    assert all(ledger.user_count(user) == 1 for user in held)
    assert ledger.user_count("user0") == 0 and ledger.user_count("steady") == 3


def _take(fd: int, slots: int, worker: int, rounds: int, results) -> None:
    memory = SharedMemory(fd, 3, slots, 2)  # mapped as a worker maps it: the parent's layout
    ledger = SharedLedger(memory, worker, KEY)
    granted = 0
    for _ in range(rounds):
        if ledger.acquire("racer", 1, 0, 0, 25, 0) is None:
            granted += 1
    results.put(granted)


def test_processes_racing_for_one_quota_never_pass_it(memory) -> None:
    """The check and the count are one locked step: three processes asking at once for 40
    slots each get 25 in all, never more."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    procs = [context.Process(target=_take, args=(memory.fd, memory.slots, w, 40, results))
             for w in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert sum(results.get(timeout=5) for _ in procs) == 25
    assert SharedLedger(memory, 0, KEY).user_count("racer") == 25


def test_held_ports_are_per_address_and_cleared_with_their_worker(memory) -> None:
    held = HeldPorts(memory, ["127.0.0.1", "::1"])
    held.set("127.0.0.1", 50000, True)
    held.set("::1", 50001, True)
    assert held.held("127.0.0.1", 50000) and not held.held("::1", 50000)
    assert held.held("::1", 50001) and not held.held("192.0.2.1", 50000)
    assert not held.held("127.0.0.1", 70000)
    memory.clear_worker(2, (50000, 50000))
    assert not held.held("127.0.0.1", 50000) and held.held("::1", 50001)
    held.set("::1", 50001, False)
    assert not held.held("::1", 50001)
