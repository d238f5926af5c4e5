"""The shipped systemd unit: required settings, and systemd's own security rating."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "turnd.service"
MAX_EXPOSURE = 2.0
# drain_timeout_s default; the stop timeout must outlast it.
DEFAULT_DRAIN_TIMEOUT_S = 600


def _parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return _parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]


def _last(service: dict[str, list[str]], key: str) -> str:
    assert key in service, f"{key}= missing"
    return service[key][-1]


def _timespan_s(value: str) -> float:
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_parser_reads_repeated_keys_and_continuations() -> None:
    parsed = _parse_unit("[S]\n# c\nA=1\nA=2\nB=x \\\n  y\n")
    assert parsed == {"S": {"A": ["1", "2"], "B": ["x  y"]}}


def test_type_notify_with_watchdog(service: dict[str, list[str]]) -> None:
    assert _last(service, "Type") == "notify"
    assert _timespan_s(_last(service, "WatchdogSec")) > 0
    # Only the main process may report state (it is the one using sdnotify).
    assert service.get("NotifyAccess", ["main"])[-1] == "main"


def test_exec_lines(service: dict[str, list[str]]) -> None:
    assert _last(service, "ExecStart") == "/opt/turnd/bin/turnd serve --config /etc/turnd/turnd.toml"
    reload_lines = service.get("ExecReload", [])
    assert "/bin/kill -HUP $MAINPID" in reload_lines
    assert _last(service, "Restart") == "on-failure"


def test_stop_timeout_outlasts_the_drain(service: dict[str, list[str]]) -> None:
    assert _timespan_s(_last(service, "TimeoutStopSec")) > DEFAULT_DRAIN_TIMEOUT_S
    # SIGTERM must reach the daemon itself (it drains), not every helper.
    assert _last(service, "KillMode") == "mixed"
    assert service.get("KillSignal", ["SIGTERM"])[-1] == "SIGTERM"


def test_only_capability_is_net_bind_service(service: dict[str, list[str]]) -> None:
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        caps = " ".join(service[key]).split()
        assert caps == ["CAP_NET_BIND_SERVICE"], key
    assert _last(service, "NoNewPrivileges") == "yes"
    # A private user namespace would void the capability for the host's
    # network namespace, so binding 443 would fail.
    assert service.get("PrivateUsers", ["no"])[-1] in ("no", "false", "0")


def test_runs_as_dedicated_non_root_user(service: dict[str, list[str]]) -> None:
    user = _last(service, "User")
    assert user not in ("", "root", "0")
    assert _last(service, "Group") not in ("", "root", "0")


def test_state_directory_holds_a_generated_secret(service: dict[str, list[str]]) -> None:
    # The user has no home and ProtectSystem=strict leaves nothing else writable: a shared
    # secret turnd generates for a run (no secrets_file) goes to $STATE_DIRECTORY.
    assert _last(service, "StateDirectory") == "turnd"
    assert int(service.get("StateDirectoryMode", ["0755"])[-1], 8) & 0o077 == 0


def test_file_descriptor_limit_covers_relay_port_range(service: dict[str, list[str]]) -> None:
    soft, _, hard = _last(service, "LimitNOFILE").partition(":")
    assert int(soft) >= 65536
    assert int(hard or soft) >= int(soft)


def test_no_network_isolation_that_would_break_relaying(service: dict[str, list[str]]) -> None:
    assert service.get("PrivateNetwork", ["no"])[-1] in ("no", "false", "0")
    assert "IPAddressDeny" not in service
    families = " ".join(service["RestrictAddressFamilies"]).split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return tool


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_security_exposure_rating() -> None:
    tool = _systemd_analyze()
    result = _run([tool, "--no-pager", "security", "--offline=true", str(UNIT)])
    output = result.stdout + result.stderr
    if "offline" in output and ("unrecognized option" in output or "Unknown option" in output):
        pytest.skip("systemd-analyze has no --offline (needs systemd >= 250)")
    match = re.search(r"Overall exposure level for [^:]+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure level in output:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, output


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    # verify insists that ExecStart binaries exist; point the daemon's at
    # /bin/true so everything else in the unit still gets checked.
    text = UNIT.read_text(encoding="utf-8").replace("/opt/turnd/bin/turnd", "/bin/true")
    if not Path("/bin/kill").exists():
        text = text.replace("/bin/kill", "/bin/true")
    copy = tmp_path / "turnd.service"
    copy.write_text(text, encoding="utf-8")
    result = _run([tool, "--no-pager", "verify", str(copy)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "turnd.service" not in result.stderr, result.stderr


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles not installed")
def test_tmpfiles_entry_closes_every_file_with_secrets(tmp_path: Path) -> None:
    # In a private root with its own group database: turnd is group 999 there.
    root = tmp_path / "root"
    (root / "etc" / "turnd" / "tls").mkdir(parents=True)
    (root / "etc" / "group").write_text("root:x:0:\nturnd:x:999:\n")
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    names = ["turnd.toml", "secrets", "users", "tls/privkey.pem", "tls/fullchain.pem"]
    for name in names:
        path = root / "etc" / "turnd" / name
        path.write_text("x\n")
        path.chmod(0o644)
    conf = Path(__file__).resolve().parents[2] / "systemd" / "turnd.tmpfiles.conf"
    result = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for name in names:
        st = (root / "etc" / "turnd" / name).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 999), name
