"""Rate limits kept by the core: token buckets for relayed bytes and for unauthenticated answers.

Both are sans-IO: they take ``now`` (monotonic seconds) from the caller.

* :class:`TokenBucket` caps the bytes an allocation (or the whole server) relays per second in
  one direction. The per-packet cost is one subtraction and one compare; the refill, which
  needs the clock, runs only when the credit goes negative.
* :class:`SourceRateLimiter` caps the unauthenticated answers (401, 438, pre-authentication
  400 and 420) sent to one source address, so the server cannot be used as a reflector. Its
  buckets live in a fixed-size table indexed by a keyed hash of the address: a flood of spoofed
  sources costs no memory, it only shares buckets.
"""

from __future__ import annotations

import math

from ..accel import native

INFINITY = math.inf


class TokenBucket:
    """Bytes per second with a burst of one second's worth. ``rate <= 0``: unlimited."""

    __slots__ = ("credit", "rate", "burst", "stamp")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = INFINITY
        self.burst = INFINITY
        self.credit = INFINITY
        self.stamp = now
        self.set_rate(rate, now)

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate (a reload); the credit is kept, capped at the new burst."""
        if rate > 0:
            self.rate = float(rate)
            self.burst = float(rate)
            if self.credit > self.burst:
                self.credit = self.burst
        else:
            self.rate = self.burst = self.credit = INFINITY
        self.stamp = now

    def refill(self, now: float, size: int) -> bool:
        """Called when taking ``size`` made the credit negative: add what accrued since the
        last refill. True when the packet fits after all; otherwise the credit is given back
        and the caller drops the packet."""
        elapsed = now - self.stamp
        # Two clocks a few milliseconds apart (the loop's and the data plane's): never take
        # credit back for a negative interval.
        credit = self.credit + size + (elapsed * self.rate if elapsed > 0 else 0.0)
        if credit > self.burst:
            credit = self.burst
        if now > self.stamp:
            self.stamp = now
        if credit >= size:
            self.credit = credit - size
            return True
        self.credit = credit
        return False


class QuotaLedger:
    """What ``user_quota`` and ``max_allocations`` count in one process: allocations plus
    EVEN-PORT reservations, per quota key (the user part of a REST username) and in all.

    A check and its count are one step (``acquire``), so a ledger shared by several processes
    (turnserver/io/shared.py, same interface) can make them atomic.
    """

    __slots__ = ("_users", "_total")

    def __init__(self) -> None:
        self._users: dict[str, int] = {}
        self._total = 0

    def acquire(self, key: str, needed: int, credit_user: int, credit_total: int,
                user_quota: int, max_total: int) -> str | None:
        """Count ``needed`` more for ``key`` when both limits allow it (``credit_*``: held
        now but about to be handed over, so not counted twice); otherwise the limit that
        refuses, "user_quota" or "max_allocations", and nothing is counted."""
        user = self._users.get(key, 0)
        if user_quota and user - credit_user + needed > user_quota:
            return "user_quota"
        if max_total and self._total - credit_total + needed > max_total:
            return "max_allocations"
        self._users[key] = user + needed
        self._total += needed
        return None

    def release(self, key: str, count: int = 1) -> None:
        user = self._users.get(key, 0)
        if user <= count:
            self._users.pop(key, None)
            count = user
        else:
            self._users[key] = user - count
        self._total -= count

    def user_count(self, key: str) -> int:
        return self._users.get(key, 0)

    def total(self) -> int:
        return self._total


PyTokenBucket = TokenBucket
if native is not None:
    # The same bucket in C, so the compiled data path (turnserver/_datapath.c) and this core
    # draw on one allocation's credit.
    TokenBucket = native.TokenBucket  # type: ignore[misc,assignment]


class SourceRateLimiter:
    """``rate`` answers per second per source address, bursts of ``burst``; ``rate <= 0``: off.

    The table has ``slots`` buckets (a power of two). Sources that hash to the same bucket
    share it, so the state is bounded whatever the number of sources; the hash is keyed with
    ``seed`` so that nobody outside can aim at one bucket.
    """

    __slots__ = ("rate", "burst", "_mask", "_tokens", "_stamps", "_seed")

    def __init__(self, rate: float, burst: float, *, seed: int, slots: int = 4096) -> None:
        if slots <= 0 or slots & (slots - 1):
            raise ValueError("slots must be a power of two")
        self.rate = float(rate)
        self.burst = float(max(burst, 1))
        self._mask = slots - 1
        self._tokens = [self.burst] * slots
        self._stamps = [-INFINITY] * slots
        self._seed = seed

    @property
    def slots(self) -> int:
        return self._mask + 1

    def allow(self, source: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        i = hash((self._seed, source)) & self._mask
        elapsed = now - self._stamps[i]
        tokens = self._tokens[i] + elapsed * self.rate if elapsed > 0 else self._tokens[i]
        if tokens > self.burst:
            tokens = self.burst
        self._stamps[i] = now
        if tokens < 1.0:
            self._tokens[i] = tokens
            return False
        self._tokens[i] = tokens - 1.0
        return True
