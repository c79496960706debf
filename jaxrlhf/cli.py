"""The launcher layer's command line: ``parse_cli`` reads ``[--config FILE] [key=value ...]``
into a validated Config, and ``main_guard`` turns a user error into one line on stderr."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

from jaxrlhf.config import Config, load_config
from jaxrlhf.errors import USER_ERRORS, ConfigError, DataError

__all__ = ["main_guard", "parse_cli"]

_USAGE = "usage: {prog} [--config FILE.yaml] [dotted.key=value ...]"


def parse_cli(argv: Sequence[str] | None = None, default_config: str | None = None) -> Config:
    """A launcher's command line: ``[--config FILE] [key=value ...]`` -> validated Config."""
    args = list(sys.argv[1:] if argv is None else argv)
    path, overrides = default_config, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            print(_USAGE.format(prog=Path(sys.argv[0]).name))
            raise SystemExit(0)
        if arg in ("-c", "--config"):
            if i + 1 >= len(args):
                raise ConfigError(f"option {arg} needs a file name after it")
            path, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; expected --config FILE and key=value pairs")
        else:
            overrides.append(arg)
        i += 1
    return load_config(path, overrides)


P = ParamSpec("P")
R = TypeVar("R")


def main_guard(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a launcher's ``main``: a ConfigError (or an unknown registry name picked in the
    config) or a bad dataset (`DataError`) becomes one line on stderr and exit code 2, never a
    traceback."""

    @functools.wraps(fn)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            kind = "data" if isinstance(err, DataError) else "config"
            message = " ".join(str(err).split())
            print(f"{kind} error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    return guarded
