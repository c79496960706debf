"""The launcher layer's command line: ``parse_cli`` reads ``[--config FILE] [key=value ...]``
into a validated Config (``--help-config [group]`` prints the schema instead), and
``main_guard`` turns a user error into one line on stderr."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar, get_args, get_origin

import yaml

from jaxrlhf.config import Config, load_config
from jaxrlhf.config.validation import REGISTRY_FIELDS, _group_class, _hints, _is_union
from jaxrlhf.errors import USER_ERRORS, ConfigError, DataError, RunStopped

__all__ = ["config_help", "main_guard", "parse_cli"]

_USAGE = (
    "usage: {prog} [--config FILE.yaml] [dotted.key=value ...]\n"
    "       {prog} --help-config [GROUP]   (fields, types, defaults, bounds and help)"
)


def parse_cli(argv: Sequence[str] | None = None, default_config: str | None = None) -> Config:
    """A launcher's command line: ``[--config FILE] [key=value ...]`` -> validated Config.
    ``--help-config [GROUP]`` prints `config_help` and exits."""
    args = list(sys.argv[1:] if argv is None else argv)
    path, overrides = default_config, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            print(_USAGE.format(prog=Path(sys.argv[0]).name))
            raise SystemExit(0)
        if arg == "--help-config" or arg.startswith("--help-config="):
            group = arg.partition("=")[2] or None
            if group is None and i + 1 < len(args) and not args[i + 1].startswith("-"):
                group = args[i + 1]
            print(config_help(group), end="")
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


# ----------------------------------------------------------------------------- --help-config


def config_help(group: str | None = None) -> str:
    """The schema as text: for every group (or only ``group``, e.g. ``algorithm`` or
    ``actor.optimizer``) one line per field, ``  key: type = default  (bounds)``, then its help
    (and, for a field naming a registry entry, the registered names). Defaults are those of an
    empty config, resolved."""
    groups = dict(_groups(Config, Config(), ""))
    if group is not None and group not in groups:
        close = difflib.get_close_matches(group, list(groups), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "groups are " + ", ".join(groups)
        raise ConfigError(f"--help-config: unknown config group {group!r}; {hint}")
    chosen = [g for g in groups if group is None or g == group or g.startswith(f"{group}.")]
    return "\n".join(groups[g] for g in chosen)


def _groups(cls: type, value: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """(dotted group name, its help block) for ``cls``'s subgroups, depth first; ``value`` is
    the group's default instance (None for an optional group: its class defaults)."""
    hints = _hints(cls)
    value = cls() if value is None else value
    lines: list[str] = []
    subgroups: list[tuple[str, type, Any]] = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}.{f.name}" if prefix else f.name, hints[f.name]
        sub = _group_class(tp)
        if sub is not None:
            subgroups.append((key, sub, getattr(value, f.name)))
            if prefix:
                lines.append(f"  {key}: {_type_text(tp)}  (group, below)")
                lines.append(f"      {f.metadata['help']}")
            continue
        bounds = _bounds_text(f.metadata)
        lines.append(f"  {key}: {_type_text(tp)} = {_yaml(getattr(value, f.name))}{bounds}")
        lines.append(f"      {f.metadata['help']}")
        if key in REGISTRY_FIELDS:
            lines.append(f"      registered: {', '.join(REGISTRY_FIELDS[key].names())}")
    if prefix:
        title = (cls.__doc__ or "").strip().split("\n\n")[0]
        yield prefix, f"[{prefix}] {' '.join(title.split())}\n" + "".join(f"{ln}\n" for ln in lines)
    for key, sub, sub_value in subgroups:
        yield from _groups(sub, sub_value, key)


def _type_text(tp: Any) -> str:
    """A type hint as Python source (``float | None``, ``Literal['sync', 'async']``)."""
    if tp is type(None):
        return "None"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if _is_union(tp):
        return " | ".join(_type_text(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_text(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _yaml(value: Any) -> str:
    """A default as YAML (``null``, ``[0.9, 0.999]``, ``gae``)."""
    plain = list(value) if isinstance(value, tuple) else value
    text = yaml.safe_dump(plain, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix(" ...")


_BOUND_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _bounds_text(meta: Any) -> str:
    """``  (> 0 and < 1)``, ``  (>= 1 or -1)``, or nothing for an unbounded field."""
    bounds = [f"{word} {meta[k]}" for k, word in _BOUND_WORDS.items() if k in meta]
    if not bounds:
        return ""
    also = "".join(f" or {_yaml(v)}" for v in meta.get("also", ()))
    return f"  ({' and '.join(bounds)}{also})"


# ----------------------------------------------------------------------------- main_guard

P = ParamSpec("P")
R = TypeVar("R")


# Exit statuses of a launcher: 0 done (or stopped by a STOP file, after a save); 1 a bug (a
# traceback); 2 bad user input; 3 training diverged (`DivergedError`, nothing saved from the bad
# state); 75 a peer process died (`distributed.EXIT_PEER_LOST`); 128 + N stopped by signal N
# after a save (130 SIGINT, 138 SIGUSR1, 143 SIGTERM: the shell's code for "ended by signal N",
# so a scheduler sees an unfinished run); 130 also for Ctrl-C outside the training loop (no
# save); a second Ctrl-C ends the process by SIGINT at once (the shell shows 130).
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def main_guard(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a launcher's ``main``: a ConfigError (or an unknown registry name picked in the
    config) or a bad dataset (`DataError`) becomes one line on stderr and exit code 2, never a
    traceback; a run that stopped early (`RunStopped`: a signal, divergence) prints its one line
    and exits with its code; Ctrl-C outside the training loop exits 130 without a traceback."""

    @functools.wraps(fn)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            kind = "data" if isinstance(err, DataError) else "config"
            message = " ".join(str(err).split())
            print(f"{kind} error: {message}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except RunStopped as err:
            print(" ".join(str(err).split()), file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        except KeyboardInterrupt:
            print(
                "jaxrlhf: interrupted (SIGINT); stopped without saving (checkpoints already "
                "written are kept).",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_INTERRUPTED) from None

    return guarded
