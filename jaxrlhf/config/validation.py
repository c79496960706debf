"""Checking config values: type coercion driven by each field's type hint (int, float, bool, str,
Optional, Literal, list / tuple, nested dataclass), the bounds declared in its metadata, and the
one table of rules that span several fields (`_check_cross_fields`). Every bad value raises
`ConfigError` with one sentence naming the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from jaxrlhf.config.schema import Config
from jaxrlhf.errors import ConfigError


def _check_cross_fields(cfg: Config) -> None:
    """Rules that involve more than one field, all in one place."""
    a, g, m, d = cfg.algorithm, cfg.generation, cfg.actor, cfg.data
    n_seqs, seq_len = d.batch_size * g.n_samples, d.max_prompt_len + g.max_new_tokens
    rules: list[tuple[bool, str]] = [
        (not cfg.experiment.name.strip(), "experiment.name must not be empty"),
        (
            a.eps_clip_high is not None and a.eps_clip_high < a.eps_clip,
            f"algorithm.eps_clip_high ({a.eps_clip_high}) must be >= "
            f"algorithm.eps_clip ({a.eps_clip})",
        ),
        (
            cfg.critic.enabled is False and a.advantage_estimator == "gae",
            "algorithm.advantage_estimator 'gae' needs a critic, but critic.enabled is false",
        ),
        (
            a.advantage_estimator in ("grpo", "dr_grpo", "rloo") and g.n_samples < 2,
            f"algorithm.advantage_estimator {a.advantage_estimator!r} compares responses "
            f"within a group, so generation.n_samples must be >= 2, got {g.n_samples}",
        ),
        (
            cfg.ref.enabled is False and a.kl_coef > 0,
            f"algorithm.kl_coef is {a.kl_coef} but ref.enabled is false; set kl_coef=0 "
            "or enable the reference model",
        ),
        (
            cfg.reward_model.enabled and cfg.reward_model.path is None,
            "reward_model.path must be set when reward_model.enabled is true",
        ),
        (
            cfg.reward_model.enabled
            and not (cfg.reward_model.weight or cfg.reward_model.rule_weight),
            "reward_model.weight and reward_model.rule_weight are both 0, so every reward is 0",
        ),
        (
            g.min_new_tokens > g.max_new_tokens,
            f"generation.min_new_tokens ({g.min_new_tokens}) must be <= "
            f"generation.max_new_tokens ({g.max_new_tokens})",
        ),
        (
            n_seqs % a.n_minibatches != 0,
            f"data.batch_size * generation.n_samples ({n_seqs} sequences) must be divisible "
            f"by algorithm.n_minibatches ({a.n_minibatches})",
        ),
        (
            m.path is None and m.head_dim is None and m.hidden_size % m.num_heads != 0,
            f"actor.hidden_size ({m.hidden_size}) must be divisible by actor.num_heads "
            f"({m.num_heads}) unless actor.head_dim is set",
        ),
        (
            m.path is None and m.num_heads % m.num_kv_heads != 0,
            f"actor.num_heads ({m.num_heads}) must be divisible by actor.num_kv_heads "
            f"({m.num_kv_heads})",
        ),
        (
            m.path is None and seq_len > m.max_position_embeddings,
            f"data.max_prompt_len + generation.max_new_tokens ({seq_len}) must be <= "
            f"actor.max_position_embeddings ({m.max_position_embeddings})",
        ),
        (
            cfg.distributed.num_processes is not None
            and cfg.distributed.process_id is not None
            and cfg.distributed.process_id >= cfg.distributed.num_processes,
            f"distributed.process_id ({cfg.distributed.process_id}) must be < "
            f"distributed.num_processes ({cfg.distributed.num_processes})",
        ),
        (
            cfg.async_ppo.proximal == "fused" and a.ppo_epochs * a.n_minibatches != 1,
            "async_ppo.proximal 'fused' takes π_prox from the single update of a batch; it "
            f"needs ppo_epochs = n_minibatches = 1, got {a.ppo_epochs} and {a.n_minibatches}",
        ),
    ]
    for broken, message in rules:
        if broken:
            raise ConfigError(message)


_NoneType = type(None)


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple | dict):
        return yaml.safe_dump(_plain(value), default_flow_style=True, width=1000).strip()
    return repr(value)


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _describe(tp: Any) -> str:
    """An expected type in words."""
    if tp is bool:
        return "a boolean (true or false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return "a mapping of settings"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if _is_union(tp):
        words = [_describe(a) for a in args if a is not _NoneType]
        return " or ".join(words) + (" or null" if _NoneType in args else "")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list (of {_describe(args[0])} each)"
    if origin is tuple:
        return f"a list of {len(args)} values"
    if origin is list:
        return f"a list (of {_describe(args[0])} each)"
    if origin is dict:
        return "a mapping"
    return str(tp)


class _TypeMismatch(ConfigError):
    def __init__(self, key: str, value: Any, tp: Any) -> None:
        self.key = key
        super().__init__(
            f"config key '{key}' expects {_describe(tp)}, got {_show(value)} ({_kind(value)})"
        )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in get_type_hints(cls).items() if k in names}


def _group_class(tp: Any) -> type | None:
    """The dataclass behind ``tp`` (itself, or inside Optional), or None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        classes = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and convert it (YAML list -> tuple, int or
    numeric string -> float, mapping -> dataclass)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None:
            if _NoneType in args:
                return None
            raise _TypeMismatch(key, value, tp)
        for arg in (a for a in args if a is not _NoneType):
            try:
                return _coerce(value, arg, key)
            except _TypeMismatch as err:
                if err.key != key:  # an item deeper down is wrong: report that one
                    raise
        raise _TypeMismatch(key, value, tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"config key '{key}' must be {_describe(tp)}, got {_show(value)}{hint}"
            )
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _as_number(value)
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)
    elif tp is float:
        number = float(value) if type(value) is int else _as_number(value)
        if number is not None and not math.isnan(number):
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, list | tuple):
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(value) != len(args):
                    raise _TypeMismatch(key, value, tp)
                item_types = args
            else:
                item_types = (args[0],) * len(value)
            items = [
                _coerce(v, t, f"{key}[{i}]")
                for i, (v, t) in enumerate(zip(value, item_types, strict=True))
            ]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, Mapping):
            return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"config.py does not know how to check the type {tp!r} of '{key}'")
    raise _TypeMismatch(key, value, tp)


def _as_number(value: Any) -> float | None:
    """YAML 1.1 reads '1e-6' (no dot) as a string; accept such numeric strings as numbers."""
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            return None
    return None


def _check_bounds(key: str, value: Any, meta: Mapping[str, Any], written: Any) -> None:
    """Check ``value`` (per element for lists) against the field's bounds; messages show the
    value as ``written``."""
    bounds = {k: meta[k] for k in ("ge", "gt", "le", "lt") if k in meta}
    if value is None or not bounds:
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_bounds(f"{key}[{i}]", item, meta, written[i])
        return
    if value in meta.get("also", ()):
        return
    ok = {
        "ge": lambda b: value >= b,
        "gt": lambda b: value > b,
        "le": lambda b: value <= b,
        "lt": lambda b: value < b,
    }
    if all(ok[k](b) for k, b in bounds.items()):
        return
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    expected = " and ".join(f"{words[k]} {_show(b)}" for k, b in bounds.items())
    expected += "".join(f" or {_show(v)}" for v in meta.get("also", ()))
    raise ConfigError(f"config key '{key}' must be {expected}, got {_show(written)}")


def _plain(obj: Any) -> Any:
    """Dataclasses -> dicts and tuples -> lists, recursively (YAML-ready)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass ``cls`` from a mapping, checking every key and value."""
    if not isinstance(data, Mapping):
        if not prefix:
            raise ConfigError(f"a config must be a mapping of groups, got {_kind(data)}")
        raise ConfigError(
            f"config key '{prefix}' is a group of settings and expects a mapping, "
            f"got {_show(data)} ({_kind(data)})"
        )
    hints = _hints(cls)
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise _unknown_key(key)
        kwargs[name] = _coerce(value, hints[name], key)
        _check_bounds(key, kwargs[name], meta[name], value)
    return cls(**kwargs)


@functools.cache
def _all_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of ``cls``, groups included."""
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}.{name}" if prefix else name
        keys.append(key)
        sub = _group_class(tp)
        if sub is not None:
            keys.extend(_all_keys(sub, key))
    return tuple(keys)


def _unknown_key(key: str) -> ConfigError:
    keys = _all_keys()
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    guess = None
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        guess = f"{parent}.{close[0]}" if parent else close[0]
    else:  # the same name in another group, e.g. 'actor.lr' -> 'actor.optimizer.lr'
        same = [k for k in keys if k.rpartition(".")[2] == leaf]
        if same:
            guess = max(same, key=lambda k: len(_common_prefix(k, key)))
        elif parent and parent not in keys:  # a typo in a group name
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            guess = close[0] if close else None
    if guess is not None:
        return ConfigError(f"unknown config key '{key}'; did you mean '{guess}'?")
    while parent and parent not in keys:  # name the valid keys under the deepest valid group
        parent = parent.rpartition(".")[0]
    valid = ", ".join(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)
    where = f"under '{parent}'" if parent else "at the top level"
    return ConfigError(f"unknown config key '{key}'; valid keys {where} are {valid}")


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a (YAML-shaped) mapping; missing keys take defaults."""
    cfg = _build(Config, d, "")
    _check_cross_fields(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars."""
    return _plain(cfg)


def validate(cfg: Config) -> Config:
    """Check a Config built in Python (constructors do not check values)."""
    return config_from_dict(config_to_dict(cfg))
