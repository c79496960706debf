"""Reading and writing configs: a strict YAML loader (a key written twice is an error), dotted
``key=value`` overrides (the AReaL / verl convention; an unknown key gets validation's
did-you-mean sentence), and dumping a resolved config back to YAML that loads to an equal
Config::

    cfg = load_config("configs/toy_ppo.yaml", ["actor.optimizer.lr=1e-6", "mesh.fsdp=2"])
    save_config(cfg, f"{cfg.experiment.output_dir}/config.yaml")
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import yaml

from jaxrlhf.config.schema import Config
from jaxrlhf.config.validation import (
    _group_class,
    _hints,
    _is_union,
    _kind,
    _NoneType,
    _show,
    _unknown_key,
    config_from_dict,
    config_to_dict,
)
from jaxrlhf.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_show(key)} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; expected a YAML file")
    if not p.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file '{path}': {err}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context or "syntax error"
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of config groups "
            f"(experiment, actor, ...), got {_kind(data)}"
        )
    return data


def _apply_override(raw: dict[str, Any], text: str) -> None:
    """Set one ``dotted.key=value`` in the raw (pre-validation) config mapping."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override {text!r} must have the form key=value, e.g. 'actor.optimizer.lr=1e-6'"
        )
    parts = key.split(".")
    tp: Any = Config
    for i, part in enumerate(parts):
        cls = _group_class(tp)
        if cls is None:
            group = ".".join(parts[:i])
            raise ConfigError(
                f"config key '{group}' is a single value, not a group, so override key "
                f"'{key}' does not exist"
            )
        if part not in _hints(cls):
            raise _unknown_key(key)
        tp = _hints(cls)[part]
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "syntax error"
        raise ConfigError(
            f"override {text!r} has a value that is not valid YAML: {problem}"
        ) from None
    if isinstance(value, bool | int | float) and _wants_string(tp):
        value = value_text.strip()  # e.g. experiment.name=2024 stays the string '2024'
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}  # absent, or null for an Optional group being filled in
        node = node[part]
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict) and _group_class(tp):
        node[last] = _merge(node[last], value)
    else:
        node[last] = value


def _wants_string(tp: Any) -> bool:
    kinds = [a for a in get_args(tp) if a is not _NoneType] if _is_union(tp) else [tp]
    return kinds == [str]


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        both = isinstance(out.get(k), dict) and isinstance(v, Mapping)
        out[k] = _merge(out[k], v) if both else v
    return out


class _Dumper(yaml.SafeDumper):
    """Block-style groups, flow-style lists: ``betas: [0.9, 0.999]``."""


_Dumper.add_representer(
    list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML that ``load_config`` reads back to an equal Config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, width=100)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config to ``path`` (parent directories are created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(config_to_yaml(cfg), encoding="utf-8")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (defaults when ``path`` is None), apply ``key=value`` overrides (values
    are YAML scalars or lists, ``null`` for None) and validate."""
    raw = _read_yaml(path) if path is not None else {}
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    for text in overrides:
        _apply_override(raw, text)
    return config_from_dict(raw)


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with dotted ``key=value`` overrides applied and validated."""
    raw = config_to_dict(cfg)  # fresh containers, safe to edit
    for text in overrides:
        _apply_override(raw, text)
    return config_from_dict(raw)
