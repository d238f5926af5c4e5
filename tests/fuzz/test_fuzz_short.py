"""Fuzzing, short form.

Proves: every seed and every saved crash input passes its target's invariants (plain function
calls, no atheris needed); the seed corpus is exactly what ``seed_inputs`` builds and reaches
the core's data paths past authentication; the targets' checks catch the kinds of bug they
are there for; and, with atheris installed, a bounded coverage-guided run of each target finds
no crash.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fuzz import targets
from tests.fuzz.targets import TARGETS, run_core, seed_inputs, stream_framer, stun_decode
from turnserver.stun import Method, StreamFramer
from turnserver.turn.core import TurnCore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _inputs(base: Path) -> list[Any]:
    params = []
    for target in TARGETS:
        folder = base / target
        if folder.is_dir():
            params += [pytest.param(target, path, id=f"{target}/{path.name}")
                       for path in sorted(folder.iterdir())
                       if path.is_file() and not path.name.startswith(".")]
    return params


@pytest.mark.parametrize(("target", "path"), _inputs(HERE / "corpus"))
def test_seed_input_keeps_the_invariants(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize(("target", "path"), _inputs(HERE / "regressions"))
def test_regression_input_keeps_the_invariants(target: str, path: Path) -> None:
    """A crash the fuzzer once found: it fails here until the bug is fixed."""
    TARGETS[target](path.read_bytes())


def test_seed_corpus_is_what_seed_inputs_builds() -> None:
    """``python3 -m tests.fuzz --write-seeds`` wrote the corpus, in the targets' current format."""
    total = 0
    for target, seeds in seed_inputs().items():
        folder = HERE / "corpus" / target
        on_disk = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        assert on_disk == seeds, f"{folder} is stale: run python3 -m tests.fuzz --write-seeds"
        total += sum(map(len, on_disk.values()))
    assert total < 100_000


def test_core_seed_gets_past_authentication_to_the_data_paths() -> None:
    run = run_core(seed_inputs()["turn_core"]["exchange"])
    answers = run.answers
    assert answers[(Method.ALLOCATE, 401)] == 1  # the challenge
    for method in (Method.ALLOCATE, Method.CREATE_PERMISSION, Method.CHANNEL_BIND, Method.REFRESH,
                   Method.BINDING):
        assert answers[(method, 200)] == 1, answers
    assert run.sent_to_peer == 2  # the ChannelData and the Send indication
    assert run.to_client == 2  # one as ChannelData, one as a Data indication


def test_core_seed_reaches_the_per_allocation_limits() -> None:
    run = run_core(seed_inputs()["turn_core"]["limits"])
    refused = run.h.core.stats.limit_refusals
    assert refused["permissions"] == 2 and refused["channels"] == 1, dict(refused)
    assert refused["allocation_bandwidth"] == 1, dict(refused)
    assert run.answers[(Method.CREATE_PERMISSION, 200)] == 1
    assert run.answers[(Method.CHANNEL_BIND, 200)] == 2
    assert run.to_client == 2  # the third datagram was over the allocation's bandwidth


def test_core_checks_catch_an_answer_with_another_transaction_id(monkeypatch: pytest.MonkeyPatch) -> None:
    original = TurnCore.handle_stun

    def wrong_tid(self: TurnCore, data: bytes, five_tuple: Any, now: float, sink: Any = None) -> Any:
        result = original(self, data, five_tuple, now, sink)
        return result[:8] + bytes(12) + result[20:] if isinstance(result, bytes) else result

    monkeypatch.setattr(TurnCore, "handle_stun", wrong_tid)
    with pytest.raises(AssertionError, match="another transaction ID"):
        run_core(seed_inputs()["turn_core"]["exchange"])


def test_core_checks_catch_a_relay_that_is_never_released(monkeypatch: pytest.MonkeyPatch) -> None:
    def forget(self: TurnCore, five_tuple: Any, now: float) -> None:
        self.allocations.pop(five_tuple, None)  # gone from the table, relay still bound

    monkeypatch.setattr(TurnCore, "connection_closed", forget)
    with pytest.raises(AssertionError, match="not released"):
        run_core(seed_inputs()["turn_core"]["stream_client"])


def test_core_checks_catch_timers_that_do_not_expire_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TurnCore, "handle_timer", lambda self, now: None)
    with pytest.raises(AssertionError, match="outlived handle_timer"):
        run_core(seed_inputs()["turn_core"]["stream_client"])


def test_decoder_checks_catch_a_lost_attribute(monkeypatch: pytest.MonkeyPatch) -> None:
    original = targets.decode_message

    def lossy(data: bytes) -> Any:
        msg = original(data)
        del msg.attributes[:1]
        return msg

    monkeypatch.setattr(targets, "decode_message", lossy)
    with pytest.raises(AssertionError):
        stun_decode(seed_inputs()["stun_decode"]["rfc5769_0"])


def test_framer_checks_catch_frames_lost_in_one_feed(monkeypatch: pytest.MonkeyPatch) -> None:
    class OneFramePerFeed(StreamFramer):
        def feed(self, data: Any) -> list[bytes]:
            return super().feed(data)[:1]

    monkeypatch.setattr(targets, "StreamFramer", OneFramePerFeed)
    with pytest.raises(AssertionError):
        stream_framer(seed_inputs()["stream_framer"]["exchange"])


# A bounded run per target: 20000 inputs or the time cap, whichever comes first.
TIME_CAP_S = {"stun_decode": 15, "stream_framer": 15, "turn_core": 15}


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.parametrize("target", list(TARGETS))
def test_bounded_coverage_guided_run_finds_no_crash(target: str, tmp_path: Path) -> None:
    crashes = tmp_path / "crashes"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--target", target, "--runs", "20000",
         "--max-time", str(TIME_CAP_S[target]), "--work-dir", str(tmp_path / "work"),
         "--artifacts", str(crashes), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIME_CAP_S[target] + 45)
    found = sorted(p for p in crashes.rglob("*") if p.is_file())
    log = tmp_path / "work" / f"{target}.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else proc.stderr[-3000:]
    assert proc.returncode == 0 and not found, (
        f"fuzzing {target} failed (exit {proc.returncode}); keep the input as a regression test by "
        f"copying it to tests/fuzz/regressions/{target}/:\n"
        + "\n".join(f"{p.name}: {p.read_bytes().hex()}" for p in found) + f"\n{proc.stdout}\n{tail}")
    match = re.search(rf"{target}: (\d+) inputs", proc.stdout)
    assert match, proc.stdout
    assert int(match[1]) > len(seed_inputs()[target]), f"the fuzzer ran no inputs of its own:\n{proc.stdout}"
