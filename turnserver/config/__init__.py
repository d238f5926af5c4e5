"""turnd configuration: one option registry feeding every way of setting an option.

``OPTIONS`` is the single source of truth. From it come the TOML keys, the ``--flags`` of the
command line, the ``TURND_*`` environment variables, the per-value validation and the operator
reference in ``docs/configuration.md`` (``python -m turnserver.config --markdown``), so none of
them can drift from the others.

Precedence, highest first: command-line flags > ``TURND_*`` environment variables > the TOML
file > built-in defaults.

``load_config`` only converts and range-checks single values (it must be cheap and side-effect
free). ``check_config`` does the deeper, cross-option checks that look at the file system, the
host's addresses and port conflicts; ``turnd check`` and start-up run both.

The package, one concern a module: ``registry`` (the options, ``Config``, ``Problem``),
``convert`` (one value into its type), ``load`` (file, environment, flags, secrets),
``addresses`` ("IP:PORT" syntax), ``checks`` (the deep checks and warnings, ``reload_plan``),
``flags`` (the click options) and ``reference`` (the Markdown reference). Import from the
package: its names are the interface.
"""

from __future__ import annotations

from .addresses import canonical_ip, format_hostport, parse_hostport
from .checks import CERT_WARNING_DAYS, check_config, config_warnings, reload_plan
from .convert import toml_literal
from .flags import click_options, overrides_from_click
from .load import (
    MIN_SECRET_BITS,
    credentials_configured,
    load_and_check,
    load_config,
    load_secrets,
    secret_bits,
    weak_secret_warnings,
)
from .reference import render_markdown
from .registry import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    MIN_RELAY_PORTS,
    OPTIONS,
    OPTIONS_BY_NAME,
    SECRETS_ENV,
    SECTIONS,
    Config,
    ConfigError,
    Option,
    Problem,
)

__all__ = [
    "CERT_WARNING_DAYS",
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "MIN_RELAY_PORTS",
    "MIN_SECRET_BITS",
    "OPTIONS",
    "OPTIONS_BY_NAME",
    "SECRETS_ENV",
    "SECTIONS",
    "Config",
    "ConfigError",
    "Option",
    "Problem",
    "canonical_ip",
    "check_config",
    "config_warnings",
    "credentials_configured",
    "click_options",
    "load_and_check",
    "load_config",
    "load_secrets",
    "weak_secret_warnings",
    "overrides_from_click",
    "format_hostport",
    "parse_hostport",
    "reload_plan",
    "render_markdown",
    "secret_bits",
    "toml_literal",
]
