"""Loading: the TOML file, the ``TURND_*`` environment and the command-line flags, merged by
precedence into a ``Config``; and the shared secrets, which never come from the file or argv."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping

from .convert import _BadValue, _convert
from .registry import (
    _ENV_NOT_OPTIONS,
    _SECTION_NAMES,
    ENV_PREFIX,
    OPTIONS,
    OPTIONS_BY_NAME,
    SECRETS_ENV,
    Config,
    ConfigError,
    Problem,
)

# Keys people reach for when they try to put a secret in the file; answered with where it goes.
_SECRET_LIKE_KEYS = frozenset({
    "secret", "secrets", "shared_secret", "shared_secrets", "static_auth_secret",
    "auth_secret", "password", "passwords",
})


def _unknown(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def _read_toml(path: str, problems: list[Problem]) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        problems.append(Problem("config", f"cannot read {path}: {exc.strerror or exc}"))
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(Problem("config", f"{path} is not valid TOML: {exc}"))
        return {}
    except UnicodeDecodeError:
        problems.append(Problem("config", f"{path} is not UTF-8 text"))
        return {}
    base_dir = os.path.dirname(os.path.abspath(path))
    values: dict[str, object] = {}
    for key, raw in data.items():
        option = OPTIONS_BY_NAME.get(key)
        if option is None:
            if key in _SECRET_LIKE_KEYS:
                message = ("secrets are not accepted in the configuration file; put them in "
                           f"the file named by secrets_file or in {SECRETS_ENV}")
            elif isinstance(raw, dict) and key in _SECTION_NAMES:
                message = (f"[{key}] is a section of the reference, not a table: write its "
                           "options as top-level keys")
            else:
                message = "unknown option" + _unknown(key, OPTIONS_BY_NAME)
            problems.append(Problem(key, f"{message} (in {path})"))
            continue
        try:
            value = _convert(option, raw, textual=False)
        except _BadValue as exc:
            problems.append(Problem(key, f"{exc} (in {path})"))
            continue
        if option.type == "path" and isinstance(value, str) and not os.path.isabs(value):
            # Relative to the file that names it: a service's working directory is "/", so
            # relative to the cwd would never be what the author of the file meant.
            value = os.path.normpath(os.path.join(base_dir, value))
        values[key] = value
    return values


def _from_env(env: Mapping[str, str], problems: list[Problem]) -> dict[str, object]:
    values: dict[str, object] = {}
    env_names = {o.env: o for o in OPTIONS}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in _ENV_NOT_OPTIONS:
            continue
        option = env_names.get(var)
        if option is None:
            hint = _unknown(var, list(env_names) + sorted(_ENV_NOT_OPTIONS))
            problems.append(Problem(var, "unknown environment variable" + hint))
            continue
        try:
            values[option.name] = _convert(option, env[var], textual=True)
        except _BadValue as exc:
            problems.append(Problem(option.name, f"{exc} (from {var})"))
    return values


def _from_overrides(overrides: Mapping[str, object],
                    problems: list[Problem]) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, raw in overrides.items():
        option = OPTIONS_BY_NAME.get(name)
        if option is None:
            problems.append(Problem(name, "unknown option" + _unknown(name, OPTIONS_BY_NAME)))
            continue
        if raw is None:
            continue
        try:
            values[name] = _convert(option, raw, textual=True)
        except _BadValue as exc:
            problems.append(Problem(name, f"{exc} (from {option.cli_flag})"))
    return values


def load_config(path: str | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, object] | None = None) -> Config:
    """Build the effective Config; raise ConfigError listing every problem found.

    Precedence, highest first: ``overrides`` (the command-line flags actually given) >
    ``TURND_*`` environment variables > the TOML file > built-in defaults. With ``path``
    None, DEFAULT_CONFIG_PATH is read if it exists; an explicit path must exist.
    ``env`` None means ``os.environ``.
    """
    config, problems = _load(path, env, overrides)
    if problems:
        raise ConfigError(problems)
    return config


def _load(path: str | None, env: Mapping[str, str] | None,
          overrides: Mapping[str, object] | None) -> tuple[Config, list[Problem]]:
    """The Config from every source, with each value that could not be converted left at its
    default, and the problems found; never raises."""
    environ: Mapping[str, str] = os.environ if env is None else env
    problems: list[Problem] = []
    values: dict[str, object] = {}
    # Read from the package at each call, so that setting turnserver.config.DEFAULT_CONFIG_PATH
    # (a test, an embedding program) is obeyed.
    from . import DEFAULT_CONFIG_PATH as default_path

    if path is None and os.path.exists(default_path):
        path = default_path
    if path is not None:
        values.update(_read_toml(path, problems))
    env_values = _from_env(environ, problems)
    flag_values = _from_overrides(overrides or {}, problems)
    values.update(env_values)
    values.update(flag_values)
    # A bad value from a stronger source must not leave a weaker source's good one in force.
    bad = {p.option for p in problems}
    values = {k: v for k, v in values.items() if k not in bad}
    return Config(**values), problems  # type: ignore[arg-type]


def load_and_check(path: str | None = None, *, env: Mapping[str, str] | None = None,
                   overrides: Mapping[str, object] | None = None) -> tuple[Config, list[Problem]]:
    """Load and deep-check in one pass: every problem that can be found, at once.

    Values that cannot be converted are reported and replaced by their defaults for the deep
    checks, whose problems about the same options are then left out (they would be about the
    default, not about what the operator wrote). A configuration file that cannot be read or
    parsed at all is reported alone.
    """
    # Imported here: the deep checks read secrets_file through this module.
    from .checks import check_config

    config, problems = _load(path, env, overrides)
    if any(p.option == "config" for p in problems):
        return config, problems
    reported = {p.option for p in problems}
    problems.extend(p for p in check_config(config) if p.option not in reported)
    return config, problems


# RFC 4086 §8 and NIST SP 800-107: an HMAC key should carry at least 128 bits.
MIN_SECRET_BITS = 128


def secret_bits(secret: bytes) -> int:
    """A generous estimate of a secret's strength: its length times the bits per character
    of the smallest common alphabet it is written in (hex 4, base64 6, printable 6.5, else 8).
    A secret that is long but repetitive passes it; it catches the short ones."""
    try:
        text = secret.decode("ascii")
    except UnicodeDecodeError:
        return 8 * len(secret)
    if re.fullmatch(r"[0-9a-fA-F]*", text):
        per_char = 4.0
    elif re.fullmatch(r"[A-Za-z0-9+/=_-]*", text):
        per_char = 6.0
    elif text.isprintable():
        per_char = 6.5
    else:
        per_char = 8.0
    return int(len(text) * per_char)


def credentials_configured(config: Config, env: Mapping[str, str]) -> bool:
    """Whether the operator configured any credential source (possibly empty: a revocation),
    as opposed to none at all, when `turnd serve` makes a one-run secret."""
    return bool(config.secrets_file or config.static_users_file or env.get(SECRETS_ENV, "").strip())


def weak_secret_warnings(secrets: Iterable[bytes]) -> list[str]:
    """One line per shared secret under MIN_SECRET_BITS, naming it by position only."""
    out = []
    for index, secret in enumerate(secrets, 1):
        bits = secret_bits(secret)
        if bits < MIN_SECRET_BITS:
            out.append(f"shared secret #{index} carries about {bits} bits, under "
                       f"{MIN_SECRET_BITS}: anyone who guesses it mints credentials; use "
                       "32 random bytes, e.g. from `python3 -c 'import secrets; "
                       "print(secrets.token_urlsafe(32))'`")
    return out


def load_secrets(config: Config, env: Mapping[str, str]) -> list[bytes]:
    """The REST API shared secrets: secrets_file lines first, then TURND_SECRETS.

    The first secret is the one used to mint; all are accepted, so a new secret can be
    rolled out ahead of the old one's removal. Problems name ``secrets_file`` and never
    include secret material.
    """
    secrets: list[bytes] = []
    if config.secrets_file is not None:
        try:
            with open(config.secrets_file, "rb") as f:
                data = f.read()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError([Problem("secrets_file",
                                       f"cannot read {config.secrets_file}: {reason}")]) from None
        for line in data.splitlines():
            line = line.strip()
            if line and not line.startswith(b"#"):
                secrets.append(line)
    from_env = env.get(SECRETS_ENV, "")
    # One secret per line, as in secrets_file: a comma may be part of a secret.
    for item in from_env.splitlines():
        item = item.strip()
        if item:
            secrets.append(item.encode("utf-8", "surrogateescape"))
    unique: list[bytes] = []
    for secret in secrets:
        if secret not in unique:
            unique.append(secret)
    return unique
