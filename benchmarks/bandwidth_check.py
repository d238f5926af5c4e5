"""What the bandwidth caps cost on the relay path: the core's ChannelData path with the two
token-bucket checks (the allocation's and the server's), against the same path with them
taken out, in one process, on the sans-IO core (no sockets: the check's cost, not the
kernel's, which is 20 times larger).

    python -m benchmarks.bandwidth_check [--packets N] [--repeats N]

Prints nanoseconds per packet for both and their difference. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.unit.turn_harness import CLIENT, PEER, Client, make_core  # noqa: E402
from turnserver.stun import encode_channel_data  # noqa: E402
from turnserver.turn.core import _CHANNEL_HEADER, SendToPeer, TurnCore  # noqa: E402


def without_checks(core: TurnCore):
    """TurnCore.handle_channel_data line for line, without the two bucket checks."""
    routes = core._routes
    stats = core.stats
    unpack = _CHANNEL_HEADER.unpack_from

    def handle(data: bytes, five_tuple, now: float):
        if len(data) < 4:
            stats.dropped["malformed"] += 1
            return None
        number, length = unpack(data)
        route = routes.get((five_tuple, number))
        if route is None:
            stats.dropped["unbound_channel"] += 1
            return None
        channel = route.channel
        allocation = route.allocation
        if channel.expires_at <= now or allocation.expires_at <= now:
            stats.dropped["unbound_channel"] += 1
            return None
        if len(data) < 4 + length:
            stats.dropped["malformed"] += 1
            return None
        peer = channel.peer
        if allocation.permissions.get(peer[0], 0.0) <= now:
            stats.dropped["no_permission"] += 1
            return None
        if route.own is not None and not core.policy.port_held(route.own, peer[1]):
            stats.policy_refusals["own_port"] += 1
            stats.dropped["policy"] += 1
            return None
        allocation.bytes_to_peer += length
        allocation.packets_to_peer += 1
        return SendToPeer(route.relay, data[4:4 + length], peer)
    return handle


def measure(packets: int, repeats: int) -> dict[str, float]:
    h = make_core(allocation_bandwidth_bytes_s=10**10, server_bandwidth_bytes_s=10**10)
    client = Client(h)
    client.allocate()
    client.bind(0.0, 0x4000, PEER)
    frame = encode_channel_data(0x4000, b"x" * 200)
    with_caps = h.core.handle_channel_data
    without = without_checks(h.core)
    results: dict[str, list[float]] = {"with_caps_ns": [], "without_caps_ns": []}
    for _ in range(repeats):
        for name, handle in (("with_caps_ns", with_caps), ("without_caps_ns", without)):
            now = 1.0
            started = time.perf_counter_ns()
            for _ in range(packets):
                handle(frame, CLIENT, now)
            results[name].append((time.perf_counter_ns() - started) / packets)
    out = {name: statistics.median(values) for name, values in results.items()}
    out["check_ns"] = out["with_caps_ns"] - out["without_caps_ns"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    result = measure(args.packets, args.repeats)
    print(json.dumps({k: round(v, 1) for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
