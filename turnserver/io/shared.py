"""State the worker processes share exactly: the quota ledger and the map of held relay ports.

Both live in one shared memory file (``memfd``) that the parent creates and every worker maps;
the parent hands the descriptor down with the listening sockets.

* :class:`SharedLedger` implements the core's quota ledger (``user_quota`` and
  ``max_allocations`` over all workers). Each worker writes only its own region: a count of
  everything it holds and an open-addressing table of (keyed hash of the user, count). A check
  and its increment happen under one POSIX record lock on the file (``lockf``: per process, so
  it excludes the other workers), summing the user's counts over every region. When a worker
  dies, the parent zeroes its region: what it held is free again, as its sockets are.
* :class:`HeldPorts` says which relay ports are held by some worker, one byte per port and per
  relay address, each byte written only by the worker whose slice of the range it is in. The
  peer policy asks it (a peer on the server's own relay address must be on a held port), so an
  allocation on one worker can reach an allocation on another.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from contextlib import contextmanager
from typing import Iterator

_HEADER = struct.Struct("<qq")  # count held by this worker, tombstones in its table
_SLOT = struct.Struct("<Qq")    # key hash (0: empty), count (0 with a key: a tombstone)
PORTS_PER_ADDRESS = 65536


def _next_pow2(n: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return size


class SharedMemory:
    """One shared memory file: the ledger's regions, then the held-port map."""

    def __init__(self, fd: int, workers: int, slots: int, addresses: int) -> None:
        self.fd = fd
        self.workers = workers
        self.slots = slots
        self.addresses = addresses
        self.region_size = _HEADER.size + slots * _SLOT.size
        self.ports_offset = workers * self.region_size
        self.size = self.ports_offset + addresses * PORTS_PER_ADDRESS
        self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def create(cls, workers: int, max_held_per_worker: int, addresses: int) -> "SharedMemory":
        """A new file (the parent): room for ``max_held_per_worker`` distinct users per worker
        at half load."""
        slots = _next_pow2(max(64, 2 * max_held_per_worker))
        fd = os.memfd_create("turnd-shared", 0)  # not close-on-exec: the workers inherit it
        os.set_inheritable(fd, True)
        size = workers * (_HEADER.size + slots * _SLOT.size) + addresses * PORTS_PER_ADDRESS
        os.ftruncate(fd, size)
        return cls(fd, workers, slots, addresses)

    def describe(self) -> dict[str, int]:
        """What a worker needs to map the same file (with the descriptor it inherited)."""
        return {"fd": self.fd, "workers": self.workers, "slots": self.slots, "addresses": self.addresses}

    @contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def clear_worker(self, worker: int, port_slice: tuple[int, int] | None = None) -> None:
        """Forget everything ``worker`` held (it died): its ledger region and its ports."""
        with self.locked():
            start = worker * self.region_size
            self.map[start:start + self.region_size] = bytes(self.region_size)
            if port_slice is not None:
                lo, hi = port_slice
                for index in range(self.addresses):
                    base = self.ports_offset + index * PORTS_PER_ADDRESS
                    self.map[base + lo:base + hi + 1] = bytes(hi - lo + 1)

    def close(self) -> None:
        self.map.close()


class SharedLedger:
    """The core's quota ledger over every worker (see the module's docstring)."""

    def __init__(self, memory: SharedMemory, worker: int, hash_key: bytes) -> None:
        self.memory = memory
        self.worker = worker
        self.hash_key = hash_key[:64]
        self._base = worker * memory.region_size
        self._mask = memory.slots - 1

    def _hash(self, key: str) -> int:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), key=self.hash_key,
                                 digest_size=8).digest()
        return int.from_bytes(digest, "little") or 1

    def _find(self, region: int, h: int) -> tuple[int, int]:
        """(slot offset, count) of ``h`` in a region; (-1, 0) when absent."""
        m = self.memory.map
        base = region * self.memory.region_size + _HEADER.size
        i = h & self._mask
        for _ in range(self.memory.slots):
            offset = base + i * _SLOT.size
            key, count = _SLOT.unpack_from(m, offset)
            if key == 0:
                return -1, 0
            if key == h:
                return offset, count
            i = (i + 1) & self._mask
        return -1, 0

    def _add_own(self, h: int, delta: int) -> None:
        m = self.memory.map
        offset, count = self._find(self.worker, h)
        new_slot = offset < 0
        if new_slot:
            if delta <= 0:
                return
            offset = self._free_slot(h)
        new = max(0, count + delta)
        held, tombstones = _HEADER.unpack_from(m, self._base)
        if not new_slot:
            if count > 0 and new == 0:
                tombstones += 1
            elif count == 0 and new > 0:
                tombstones -= 1
        _SLOT.pack_into(m, offset, h, new)
        _HEADER.pack_into(m, self._base, max(0, held + new - count), max(0, tombstones))
        if tombstones > self.memory.slots // 4:
            self._rebuild()

    def _free_slot(self, h: int) -> int:
        """A slot for a new key: the first empty one on its probe path (tombstones stay, so
        no other key's path is cut; the table is rebuilt when they pile up)."""
        m = self.memory.map
        base = self._base + _HEADER.size
        for _ in range(2):
            i = h & self._mask
            for _ in range(self.memory.slots):
                offset = base + i * _SLOT.size
                if _SLOT.unpack_from(m, offset)[0] == 0:
                    return offset
                i = (i + 1) & self._mask
            self._rebuild()
        raise RuntimeError("the shared quota table is full")

    def _rebuild(self) -> None:
        """Rewrite this worker's table with its live entries only."""
        m = self.memory.map
        base = self._base + _HEADER.size
        live = []
        for i in range(self.memory.slots):
            key, count = _SLOT.unpack_from(m, base + i * _SLOT.size)
            if key and count > 0:
                live.append((key, count))
        if len(live) >= self.memory.slots:
            raise RuntimeError("the shared quota table is full")
        m[base:base + self.memory.slots * _SLOT.size] = bytes(self.memory.slots * _SLOT.size)
        held = 0
        for key, count in live:
            i = key & self._mask
            while _SLOT.unpack_from(m, base + i * _SLOT.size)[0] != 0:
                i = (i + 1) & self._mask
            _SLOT.pack_into(m, base + i * _SLOT.size, key, count)
            held += count
        _HEADER.pack_into(m, self._base, held, 0)

    # -- the core's ledger ---------------------------------------------------------------

    def acquire(self, key: str, needed: int, credit_user: int, credit_total: int,
                user_quota: int, max_total: int) -> str | None:
        """Count ``needed`` more for ``key`` when the quotas allow it, over all workers; the
        limit that refuses it otherwise ("user_quota" or "max_allocations")."""
        h = self._hash(key)
        memory = self.memory
        with memory.locked():
            if user_quota:
                user = sum(self._find(w, h)[1] for w in range(memory.workers))
                if user - credit_user + needed > user_quota:
                    return "user_quota"
            if max_total:
                total = sum(_HEADER.unpack_from(memory.map, w * memory.region_size)[0]
                            for w in range(memory.workers))
                if total - credit_total + needed > max_total:
                    return "max_allocations"
            self._add_own(h, needed)
        return None

    def release(self, key: str, count: int = 1) -> None:
        h = self._hash(key)
        with self.memory.locked():
            self._add_own(h, -count)

    def user_count(self, key: str) -> int:
        h = self._hash(key)
        with self.memory.locked():
            return sum(self._find(w, h)[1] for w in range(self.memory.workers))

    def total(self) -> int:
        memory = self.memory
        with memory.locked():
            return sum(_HEADER.unpack_from(memory.map, w * memory.region_size)[0]
                       for w in range(memory.workers))


class HeldPorts:
    """Which relay ports some worker holds, by relay address (see the module's docstring)."""

    def __init__(self, memory: SharedMemory, addresses: list[str]) -> None:
        self.memory = memory
        self.index = {ip: i for i, ip in enumerate(addresses)}

    def offset(self, ip: str, port: int) -> int:
        """The byte of ip:port in the shared file (-1: not a relay address or port)."""
        return self._offset(ip, port)

    def _offset(self, ip: str, port: int) -> int:
        i = self.index.get(ip)
        if i is None or not 0 <= port < PORTS_PER_ADDRESS:
            return -1
        return self.memory.ports_offset + i * PORTS_PER_ADDRESS + port

    def set(self, ip: str, port: int, held: bool) -> None:
        offset = self._offset(ip, port)
        if offset >= 0:
            self.memory.map[offset] = 1 if held else 0

    def held(self, ip: str, port: int) -> bool:
        offset = self._offset(ip, port)
        return offset >= 0 and self.memory.map[offset] != 0
