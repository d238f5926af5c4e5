"""The layout is the architecture: stun imports nothing of ours; the sans-IO packages
(stun, turn, auth, policy, addresses.py) never import asyncio, socket or time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "turnserver"
SANS_IO = ["stun", "turn", "auth", "policy.py", "addresses.py"]
FORBIDDEN = {"asyncio", "socket", "time", "uvloop", "selectors", "ssl"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = "." * node.level + (node.module or "")
            found.add(prefix)
    return found


def files(part: str) -> list[Path]:
    target = ROOT / part
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


@pytest.mark.parametrize("part", SANS_IO)
def test_sans_io_packages_touch_no_io(part: str) -> None:
    for path in files(part):
        bad = {name for name in imports(path) if name.split(".")[0] in FORBIDDEN}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_stun_imports_nothing_else_of_ours() -> None:
    for path in files("stun"):
        for name in imports(path):
            if name.startswith(".."):
                pytest.fail(f"{path.relative_to(ROOT)} imports {name}")
            assert not name.startswith("turnserver.") or name.startswith("turnserver.stun"), (path, name)
