"""Value conversion: one raw value (TOML, environment, flag) into an option's type, with its
range; the re-check of a value already in a ``Config``; and the way back, a TOML literal."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .registry import Option

class _BadValue(Exception):
    pass


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _show(raw: object) -> str:
    """A short, printable rendering of a rejected value (options never hold secrets)."""
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def _split_list(text: str) -> list[str]:
    # Commas and newlines both separate: a comma never occurs in an address, CIDR or
    # "host:port", and newlines let a systemd Environment= or a .env file list one per line.
    return [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]


def _check_range(option: Option, value: float) -> None:
    if option.minimum is not None and value < option.minimum:
        raise _BadValue(f"must be at least {_number(option.minimum)}, got {_number(value)}")
    if option.maximum is not None and value > option.maximum:
        raise _BadValue(f"must be at most {_number(option.maximum)}, got {_number(value)}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _convert(option: Option, raw: object, *, textual: bool) -> object:
    """Turn one raw value into the option's type, or raise _BadValue saying why.

    ``textual`` sources (environment, command line) may spell any type as a string; TOML
    values must already have the right TOML type, so that `port = "80"` is caught as the
    mistake it usually is.
    """
    kind = option.type
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if textual and isinstance(raw, str):
            word = raw.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
        raise _BadValue(f"expected true or false, got {_show(raw)}")
    if kind == "int":
        value: Any
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif textual and isinstance(raw, str):
            try:
                value = int(raw.strip(), 10)
            except ValueError:
                raise _BadValue(f"expected an integer, got {_show(raw)}") from None
        else:
            raise _BadValue(f"expected an integer, got {_show(raw)}")
        _check_range(option, value)
        return value
    if kind == "float":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif textual and isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise _BadValue(f"expected a number, got {_show(raw)}") from None
        else:
            raise _BadValue(f"expected a number, got {_show(raw)}")
        if not math.isfinite(value):
            raise _BadValue(f"expected a finite number, got {_show(raw)}")
        _check_range(option, value)
        return value
    if kind == "list":
        if textual and isinstance(raw, str):
            return tuple(_split_list(raw))
        if isinstance(raw, (list, tuple)):
            if not all(isinstance(item, str) for item in raw):
                raise _BadValue(f"expected a list of strings, got {_show(raw)}")
            if textual:
                # Repeated flags (--listen-udp A --listen-udp B,C) and Python callers.
                return tuple(part for item in raw for part in _split_list(item))
            items = tuple(item.strip() for item in raw)
            if any(not item for item in items):
                raise _BadValue("list contains an empty string")
            return items
        raise _BadValue(f"expected a list of strings, got {_show(raw)}")
    # "str", "path", "choice"
    if not isinstance(raw, str):
        raise _BadValue(f"expected a string, got {_show(raw)}")
    if "\x00" in raw:
        raise _BadValue("contains a NUL character")
    if option.nullable and raw == "":
        return None
    if kind == "choice":
        word = raw.strip().lower()
        if word not in option.choices:
            raise _BadValue(f"expected one of {', '.join(option.choices)}, got {_show(raw)}")
        return word
    return raw


def _validate_field(option: Option, value: object) -> str | None:
    """Re-check a value already in a Config (which may have been built by hand)."""
    if value is None:
        return None if option.nullable else "must be set"
    if option.type == "list" and not isinstance(value, tuple):
        return f"expected a tuple of strings, got {_show(value)}"
    if option.type == "choice" and value not in option.choices:
        return f"expected one of {', '.join(option.choices)}, got {_show(value)}"
    try:
        _convert(option, value, textual=False)
    except _BadValue as exc:
        return str(exc)
    return None


def toml_literal(value: object) -> str:
    """A TOML literal for an option value (used by the docs and the coturn converter)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {type(value).__name__}")
