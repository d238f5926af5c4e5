"""What the metrics read, as one typed record: :class:`ServerSnapshot` (sans-IO).

A serving process makes a snapshot of its counters (turnserver/io/snapshot.py reads the running
server) and the collector (turnserver/metrics.py) turns one snapshot, or several, into metric
families. Several snapshots come from several worker processes: each sends its own to the
parent as JSON (:meth:`ServerSnapshot.to_dict` / :meth:`ServerSnapshot.from_dict`), and the
parent adds them up (:func:`merge`). :class:`CounterKeeper` keeps a summed counter from going
backwards when a worker dies and a fresh one takes its slot.

Every field is of one kind, listed once below (:data:`COUNTERS`, :data:`GAUGES`, :data:`PARTS`,
:data:`IDENTITY`); :func:`merge` and :class:`CounterKeeper` both go by these lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

# (transport, family) for allocations; (direction, transport) for relayed traffic.
Pair = tuple[str, str]


@dataclass(slots=True)
class ServerSnapshot:
    """One process's counters and gauges at one instant. Plain values only: no references
    into the running server, so a snapshot can be kept, merged or sent elsewhere."""

    # -- identity: the worker slot (None for a single-process server) and the process id
    worker: int | None = None
    pid: int = 0

    # -- parts: which groups of families exist (a server that has not started has no core,
    #    one without TCP/TLS listeners no stream layer)
    has_core: bool = False
    has_relay_ports: bool = False
    has_streams: bool = False
    has_tls: bool = False  # TLS certificates loaded: the reload counters exist

    # -- listeners: transport -> client listening sockets bound
    listeners: dict[str, int] = field(default_factory=dict)

    # -- the core (turnserver/turn/stats.py CoreStats and the live allocations)
    allocations: dict[Pair, int] = field(default_factory=dict)  # (transport, family), alive now
    allocations_created: dict[Pair, int] = field(default_factory=dict)  # (transport, family)
    allocations_refused: dict[str, int] = field(default_factory=dict)  # reason
    allocations_ended: dict[str, int] = field(default_factory=dict)  # reason
    permissions: int = 0
    channels: int = 0
    # (direction, transport) -> bytes / datagrams: ended allocations' plus the live ones' so far
    relayed_bytes: dict[Pair, int] = field(default_factory=dict)
    relayed_packets: dict[Pair, int] = field(default_factory=dict)
    requests: dict[tuple[str, int], int] = field(default_factory=dict)  # (method, response code)
    auth_failures: dict[str, int] = field(default_factory=dict)  # reason
    policy_refusals: dict[str, int] = field(default_factory=dict)  # the policy's reason
    dropped: dict[str, int] = field(default_factory=dict)  # reason
    limit_refusals: dict[str, int] = field(default_factory=dict)  # limit, the stream layer's too
    timer_entries: int = 0
    # RFC 6062 peer connections: (direction, result) -> count; state -> open now
    tcp_connections: dict[Pair, int] = field(default_factory=dict)
    tcp_connection_states: dict[str, int] = field(default_factory=dict)
    reservations: int = 0  # EVEN-PORT reservations held
    draining: bool = False

    # -- relay ports (turnserver/io/relay.py RelayPortPool)
    relay_ports_in_use: int = 0
    relay_ports_capacity: int = 0
    relay_bind_failures: int = 0

    # -- the stream layer (turnserver/io/stream.py StreamStats) and TLS
    stream_open: dict[str, int] = field(default_factory=dict)  # transport
    stream_accepted: dict[str, int] = field(default_factory=dict)  # transport
    stream_closed: dict[str, int] = field(default_factory=dict)  # reason
    stream_plain_on_tls: int = 0
    stream_dropped_messages: int = 0
    stream_dropped_bytes: int = 0
    stream_read_pauses: int = 0
    stream_handed_over: dict[str, int] = field(default_factory=dict)  # transport
    tls_reloads_ok: int = 0
    tls_reloads_failed: int = 0
    tls_not_after: float | None = None  # the served certificate's expiry, UNIX time

    # -- the process that made the snapshot
    cpu_seconds: float = 0.0  # user + system
    resident_memory_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: a dict keyed by tuples becomes a list of ``[*key, value]`` rows."""
        out: dict[str, Any] = {}
        for name in _NAMES:
            value = getattr(self, name)
            if name in TUPLE_KEYED:
                out[name] = [[*key, count] for key, count in value.items()]
            elif isinstance(value, dict):
                out[name] = dict(value)
            else:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServerSnapshot:
        """The inverse of :meth:`to_dict`. Missing fields keep their defaults and unknown ones
        are ignored; a value of the wrong shape raises ``ValueError`` or ``TypeError``."""
        snapshot = cls()
        for name in _NAMES:
            if name not in data:
                continue
            raw = data[name]
            if name in TUPLE_KEYED:
                first, second = TUPLE_KEYED[name]
                value: Any = {}
                for row in raw:
                    if len(row) != 3:
                        raise ValueError(f"{name}: a row is [key, key, value], not {row!r}")
                    value[(first(row[0]), second(row[1]))] = int(row[2])
            else:
                value = _convert(name, raw)
            setattr(snapshot, name, value)
        return snapshot


# -- what kind each field is: the one place merge() and CounterKeeper read ---------------------

# Only ever grow while a process lives: summed over workers; a dead worker's last values stay in
# the totals (CounterKeeper).
COUNTERS: tuple[str, ...] = (
    "allocations_created", "allocations_refused", "allocations_ended",
    "relayed_bytes", "relayed_packets", "requests",
    "auth_failures", "policy_refusals", "dropped", "limit_refusals",
    "relay_bind_failures", "tcp_connections",
    "stream_accepted", "stream_closed", "stream_plain_on_tls",
    "stream_dropped_messages", "stream_dropped_bytes", "stream_read_pauses", "stream_handed_over",
    "tls_reloads_ok", "tls_reloads_failed",
    "cpu_seconds",
)
# Say how things are now: summed over workers (each has its own slice of the relay port range,
# so capacities add up too), except draining (any worker) and tls_not_after (the earliest); a
# dead worker's gauges leave with it.
GAUGES: tuple[str, ...] = (
    "listeners", "allocations", "permissions", "channels", "timer_entries", "reservations",
    "tcp_connection_states",
    "draining", "relay_ports_in_use", "relay_ports_capacity", "stream_open", "tls_not_after",
    "resident_memory_bytes",
)
# Which groups of families exist: any worker's.
PARTS: tuple[str, ...] = ("has_core", "has_relay_ports", "has_streams", "has_tls")
# Which process made the snapshot: not merged (a merged snapshot is nobody's).
IDENTITY: tuple[str, ...] = ("worker", "pid")

# The fields keyed by tuples, with the type of each key part (JSON keeps ints as ints).
TUPLE_KEYED: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "allocations": (str, str),
    "allocations_created": (str, str),
    "relayed_bytes": (str, str),
    "relayed_packets": (str, str),
    "requests": (str, int),
    "tcp_connections": (str, str),
}

_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ServerSnapshot))
_SUMMED = tuple(n for n in COUNTERS + GAUGES if n not in ("draining", "tls_not_after"))
_DEFAULTS = ServerSnapshot()


def _convert(name: str, raw: Any) -> Any:
    template = getattr(_DEFAULTS, name)
    if name in ("worker", "tls_not_after"):
        if raw is None:
            return None
        return int(raw) if name == "worker" else float(raw)
    if isinstance(template, dict):
        if not isinstance(raw, Mapping):
            raise TypeError(f"{name}: expected an object, got {type(raw).__name__}")
        return {str(k): int(v) for k, v in raw.items()}
    if isinstance(template, bool):
        if not isinstance(raw, bool):
            raise TypeError(f"{name}: expected true or false, got {raw!r}")
        return raw
    if isinstance(template, float):
        return float(raw)
    return int(raw)


def _add_into(total: ServerSnapshot, other: ServerSnapshot, names: Iterable[str]) -> None:
    """Add ``other``'s fields ``names`` into ``total`` (dicts key by key)."""
    for name in names:
        value = getattr(other, name)
        if isinstance(value, dict):
            target: dict[Any, Any] = getattr(total, name)
            for key, count in value.items():
                target[key] = target.get(key, 0) + count
        else:
            setattr(total, name, getattr(total, name) + value)


def _copy_dicts(snapshot: ServerSnapshot) -> ServerSnapshot:
    """A copy sharing no dict with ``snapshot``, so adding into it leaves the original alone."""
    copy = ServerSnapshot()
    for name in _NAMES:
        value = getattr(snapshot, name)
        setattr(copy, name, dict(value) if isinstance(value, dict) else value)
    return copy


def merge(snapshots: Iterable[ServerSnapshot]) -> ServerSnapshot:
    """One snapshot for several processes: counters and gauges added up (dicts key by key),
    ``draining`` and the parts when any process has them, ``tls_not_after`` the earliest.
    The result belongs to no worker (``worker`` None, ``pid`` 0); the inputs are not changed."""
    total = ServerSnapshot()
    for snapshot in snapshots:
        _add_into(total, snapshot, _SUMMED)
        for name in PARTS:
            if getattr(snapshot, name):
                setattr(total, name, True)
        total.draining = total.draining or snapshot.draining
        if snapshot.tls_not_after is not None and (
            total.tls_not_after is None or snapshot.tls_not_after < total.tls_not_after
        ):
            total.tls_not_after = snapshot.tls_not_after
    return total


def counters_of(snapshot: ServerSnapshot) -> ServerSnapshot:
    """``snapshot`` with its gauges at their defaults: what stays of a process once it is gone."""
    kept = ServerSnapshot()
    for name in COUNTERS + PARTS + IDENTITY:
        value = getattr(snapshot, name)
        setattr(kept, name, dict(value) if isinstance(value, dict) else value)
    return kept


def as_list(snapshots: ServerSnapshot | Sequence[ServerSnapshot]) -> list[ServerSnapshot]:
    """What a snapshot source returned, as a list."""
    if isinstance(snapshots, ServerSnapshot):
        return [snapshots]
    return list(snapshots)


# What the collector reads: one snapshot (one process) or one per worker.
SnapshotSource = Callable[[], ServerSnapshot | Sequence[ServerSnapshot]]


@dataclass(slots=True)
class _Slot:
    live: ServerSnapshot | None = None  # the last snapshot of the slot's running process
    dead: ServerSnapshot | None = None  # the last snapshot of the process that ran before it
    carried: ServerSnapshot | None = None  # the counters of every process before that one


class CounterKeeper:
    """Per worker slot, the counters of the slot's dead processes, so totals never go back.

    The parent hands it every snapshot it reads (:meth:`update`) and says when a worker exited
    (:meth:`worker_exited`). A snapshot from a new process id in a slot also ends the previous
    process, should its exit not have been reported yet; one late snapshot from the process that
    just died (still in the pipe) updates what is kept of it instead of starting anew.
    :meth:`snapshots` gives one snapshot per slot: the running process's, with the counters of
    the slot's earlier processes added (not their gauges); a slot with no process running
    keeps its counters and has no gauges.
    """

    def __init__(self) -> None:
        self._slots: dict[int, _Slot] = {}

    def update(self, snapshot: ServerSnapshot) -> None:
        if snapshot.worker is None:
            raise ValueError("a worker's snapshot names its slot (worker is None)")
        slot = self._slots.setdefault(snapshot.worker, _Slot())
        if slot.dead is not None and snapshot.pid and snapshot.pid == slot.dead.pid:
            slot.dead = snapshot  # read after the exit was reported: counters only grow
            return
        if slot.live is not None and snapshot.pid and slot.live.pid and snapshot.pid != slot.live.pid:
            self._retire(slot)
        slot.live = snapshot

    def worker_exited(self, worker: int) -> None:
        """The slot's process is gone: from now on only its counters count."""
        slot = self._slots.get(worker)
        if slot is not None and slot.live is not None:
            self._retire(slot)

    def _retire(self, slot: _Slot) -> None:
        if slot.dead is not None:
            if slot.carried is None:
                slot.carried = counters_of(slot.dead)
            else:
                _add_into(slot.carried, slot.dead, COUNTERS)
        slot.dead, slot.live = slot.live, None

    def snapshots(self) -> list[ServerSnapshot]:
        """One snapshot per slot, in slot order, each with its earlier processes' counters."""
        out = []
        for worker in sorted(self._slots):
            slot = self._slots[worker]
            if slot.live is not None:
                combined = _copy_dicts(slot.live)
            else:
                combined = ServerSnapshot(worker=worker)
            for earlier in (slot.dead, slot.carried):
                if earlier is not None:
                    _add_into(combined, earlier, COUNTERS)
                    for name in PARTS:
                        if getattr(earlier, name):
                            setattr(combined, name, True)
            out.append(combined)
        return out

    def total(self) -> ServerSnapshot:
        """All slots added up (:func:`merge` of :meth:`snapshots`)."""
        return merge(self.snapshots())
