"""The command line: one click flag per option, and the flags given as load_config overrides."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from .registry import OPTIONS, Option

F = TypeVar("F", bound=Callable[..., Any])

_METAVAR = {"str": "TEXT", "int": "INTEGER", "float": "SECONDS", "path": "PATH",
            "list": "VALUE[,VALUE...]"}


def _metavar(option: Option) -> str:
    if option.type == "choice":
        return "[" + "|".join(option.choices) + "]"
    if option.type == "float" and not option.name.endswith("_s"):
        return "NUMBER"
    if option.name.startswith("listen_") or option.name in ("metrics_listen",
                                                             "alternate_server"):
        return "IP:PORT" + (",..." if option.type == "list" else "")
    return _METAVAR[option.type]


def click_options(func: F | None = None, *, only: Iterable[str] | None = None) -> Any:
    """Add one --flag per Option (or per option named in ``only``); a flag not given arrives
    as None. Usable bare (``@click_options``) or with ``only`` (``@click_options(only=...)``).

    Values are passed through as text and converted by load_config, so that `turnd check`
    reports every bad flag at once alongside the file's and the environment's problems.
    """
    if func is None:
        return lambda f: click_options(f, only=only)
    import click

    chosen = OPTIONS if only is None else tuple(o for o in OPTIONS if o.name in set(only))
    for option in reversed(chosen):  # decorators apply bottom-up; keep registry order in --help
        help_text = f"{option.help} [env: {option.env}]"
        if option.type == "bool":
            dash = option.name.replace("_", "-")
            decorator = click.option(f"--{dash}/--no-{dash}", option.name, default=None,
                                     help=help_text)
        elif option.type == "list":
            decorator = click.option(option.cli_flag, option.name, multiple=True,
                                     default=None, metavar=_metavar(option),
                                     help=help_text + " Repeatable; \"\" gives an empty list.")
        else:
            decorator = click.option(option.cli_flag, option.name, default=None,
                                     metavar=_metavar(option), help=help_text)
        func = decorator(func)
    return func


def overrides_from_click(kwargs: Mapping[str, object]) -> dict[str, object]:
    """The option flags actually given on the command line, for load_config(overrides=...)."""
    out: dict[str, object] = {}
    for option in OPTIONS:
        if option.name not in kwargs:
            continue
        value = kwargs[option.name]
        # A repeatable flag not given arrives as (); `--listen-tls ""` arrives as ("",) and
        # means "the empty list".
        if value is None or (option.type == "list" and value == ()):
            continue
        out[option.name] = value
    return out
