"""The sans-IO rule: auth/, policy.py and credentials.py never import asyncio, socket or time."""

import ast
from pathlib import Path

import pytest

import turnserver

PACKAGE = Path(turnserver.__file__).parent
FORBIDDEN = {"asyncio", "socket", "time", "logging"}


def imported_modules(tree: ast.AST, *, top_level_only: bool) -> set[str]:
    nodes = ast.iter_child_nodes(tree) if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


SANS_IO_FILES = sorted((PACKAGE / "auth").glob("*.py")) + [PACKAGE / "policy.py"]


@pytest.mark.parametrize("path", SANS_IO_FILES, ids=lambda p: p.name)
def test_sans_io_modules_import_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert imported_modules(tree, top_level_only=False) & FORBIDDEN == set()


def test_credentials_helper_is_standalone() -> None:
    tree = ast.parse((PACKAGE / "credentials.py").read_text(encoding="utf-8"))
    top = imported_modules(tree, top_level_only=True)
    # Importable by sans-IO code, and copyable into a backend: no package imports.
    assert top & FORBIDDEN == set()
    assert "turnserver" not in imported_modules(tree, top_level_only=False)


def test_the_checker_sees_imports() -> None:
    tree = ast.parse("import os\nfrom time import time\ndef f():\n    import socket\n")
    assert imported_modules(tree, top_level_only=True) == {"os", "time"}
    assert imported_modules(tree, top_level_only=False) == {"os", "time", "socket"}
