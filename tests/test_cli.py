"""The launcher command line: ``--help-config [group]`` against the schema it describes."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import pytest
import yaml

import jaxrlhf.config.schema as schema
from jaxrlhf.cli import config_help, parse_cli
from jaxrlhf.config import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
FIELD = re.compile(
    r"^  (?P<key>[\w.]+): (?P<type>.+?)(?: = (?P<default>.+?))?(?:  \((?P<b>.+)\))?$"
)
OPS = {">=": "ge", ">": "gt", "<=": "le", "<": "lt"}


def schema_fields() -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    """Every leaf key -> (type hint, default of an empty Config, metadata), walked directly from
    dataclasses.fields (optional groups: their class defaults)."""
    out: dict[str, tuple[Any, Any, dict[str, Any]]] = {}

    def walk(cls: type, value: Any, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, tp = f"{prefix}.{f.name}" if prefix else f.name, hints[f.name]
            sub = [a for a in (get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
            if sub:
                child = getattr(value, f.name)
                walk(sub[0], sub[0]() if child is None else child, key)
            else:
                out[key] = (tp, getattr(value, f.name), dict(f.metadata))

    walk(Config, Config(), "")
    return out


def parse_help(text: str) -> dict[str, dict[str, Any]]:
    """Field lines of --help-config -> {key: {type, default, bounds, help}}."""
    lines, parsed = text.splitlines(), {}
    for i, line in enumerate(lines):
        m = FIELD.match(line)
        if m is None or m["b"] == "group, below":
            continue
        assert m["key"] not in parsed, f"{m['key']} printed twice"
        help_line = lines[i + 1]
        assert help_line.startswith("      "), line
        bounds: dict[str, Any] = {}
        for part in (m["b"] or "").split(" and "):
            if part:
                head, *alts = part.split(" or ")
                op, _, number = head.partition(" ")
                bounds[OPS[op]] = float(number)
                if alts:
                    bounds["also"] = tuple(yaml.safe_load(a) for a in alts)
        parsed[m["key"]] = {
            "type": m["type"],
            "default": yaml.safe_load(m["default"]),
            "bounds": bounds,
            "help": help_line.strip(),
        }
    return parsed


def test_help_config_matches_the_schema() -> None:
    expected, shown = schema_fields(), parse_help(config_help())
    assert set(shown) == set(expected)
    namespace = {"Literal": Literal, **vars(schema)}
    for key, (tp, default, meta) in expected.items():
        got = shown[key]
        assert eval(got["type"], namespace) == tp, key  # the printed type is the hint itself
        plain = list(default) if isinstance(default, tuple) else default
        assert got["default"] == plain, key
        bounds = {k: float(v) for k, v in meta.items() if k in OPS.values()}
        if "also" in meta:
            bounds["also"] = meta["also"]
        assert got["bounds"] == bounds, key
        assert meta["help"].strip() and "\n" not in meta["help"], f"{key} has no one-line help"
        assert got["help"] == meta["help"], key


def test_every_field_of_every_group_has_help() -> None:
    groups = [c for c in vars(schema).values() if dataclasses.is_dataclass(c)]
    assert len(groups) >= 18
    for cls in groups:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"


def test_one_group_and_registered_names() -> None:
    text = config_help("algorithm")
    assert text.startswith("[algorithm] The RL objective")
    keys = set(parse_help(text))
    assert keys == {k for k in schema_fields() if k.startswith("algorithm.")}
    assert "      registered: dr_grpo, gae, grpo, reinforce_pp, rloo\n" in text
    sub = parse_help(config_help("critic.optimizer"))
    assert sub["critic.optimizer.lr"]["default"] == 5e-6  # the group's own default, not the class's
    assert set(parse_help(config_help("actor"))) >= {"actor.path", "actor.optimizer.lr"}


def test_unknown_group_is_one_sentence() -> None:
    with pytest.raises(ConfigError) as info:
        config_help("algoritm")
    assert str(info.value) == (
        "--help-config: unknown config group 'algoritm'; did you mean 'algorithm'?"
    )
    with pytest.raises(ConfigError) as info:
        config_help("zzz")
    assert str(info.value).startswith("--help-config: unknown config group 'zzz'; groups are ")


@pytest.mark.parametrize("form", [["--help-config", "mesh"], ["--help-config=mesh"]])
def test_parse_cli_prints_and_exits(form: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_cli(form)
    assert info.value.code == 0
    assert capsys.readouterr().out == config_help("mesh")


def _launcher(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", ROOT / "launchers" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["ppo.py", "sft.py", "rm.py"])
def test_launchers_print_help_config(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = _launcher(name).main
    with pytest.raises(SystemExit) as info:
        main(["--help-config", "generation"])
    assert info.value.code == 0
    assert capsys.readouterr().out == config_help("generation")
    with pytest.raises(SystemExit) as info:
        main(["--help-config", "generaton"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "config error: --help-config: unknown config group 'generaton'; did you mean "
        "'generation'?\n"
    )


def test_help_config_from_the_shell() -> None:
    out = subprocess.run(
        [sys.executable, "launchers/ppo.py", "--help-config"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert out == config_help()
    assert set(parse_help(out)) == set(schema_fields())
