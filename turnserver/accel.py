"""Which data path runs: the compiled extension, or the pure-Python twin.

``turnserver._datapath`` (turnserver/_datapath.c) is built by ``pip install`` where gcc and the
Python headers are present. When it is missing, or when ``TURND_PURE_PYTHON=1`` is set, the
twins with the same interface are used: ``turnserver.turn.limits.TokenBucket`` and
``turnserver.io.datapath_py.DataPlane``. Read once, at import.
"""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("TURND_PURE_PYTHON", "").strip() not in ("", "0"):
        return None
    try:
        from . import _datapath
    except ImportError:
        return None
    return _datapath


native: ModuleType | None = _load()

# "c" or "python": reported in the start-up line and in turn_build_info.
IMPLEMENTATION = "c" if native is not None else "python"
