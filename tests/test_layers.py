"""No import runs upward between the layers of docs/architecture.md ("Layers"), whose table this
test reads, so the page and the check cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxrlhf"
DOC = ROOT / "docs" / "architecture.md"


def layer_table(text: str) -> tuple[dict[str, int], dict[str, tuple[str, ...]]]:
    """From the "Layers" section: module path (``optim.py``, ``models/``) -> layer, and module
    path -> the paths it must never import (the third column)."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    never: dict[str, tuple[str, ...]] = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.match(r"\d+ ", cells[0]):
            continue
        layer = int(cells[0].split()[0])
        banned = tuple(re.findall(r"`([\w./]+)`", cells[2]))
        for path in re.findall(r"`([\w]+/|[\w]+\.py)`", cells[1]):
            assert path not in layers, f"{path} is listed twice in the layer table"
            layers[path], never[path] = layer, banned
    return layers, never


LAYERS, NEVER = layer_table(DOC.read_text(encoding="utf-8"))


def place(module: str) -> str | None:
    """The layer-table entry (``models/``, ``optim.py``) holding dotted ``module``."""
    parts = module.split(".")
    if parts[0] != "jaxrlhf":
        return None
    if len(parts) == 1:
        return "__init__.py"
    for entry in (f"{parts[1]}/", f"{parts[1]}.py"):
        if entry in LAYERS:
            return entry
    return f"{parts[1]} (not in the layer table)"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str, str]]:
    """(line, imported module, the import as written) for every import in the tree, at any
    depth (function-level imports count too); relative imports are resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = ", ".join(a.name for a in node.names)
            text = f"from {'.' * node.level}{node.module or ''} import {names}"
            if base == "jaxrlhf":  # `from jaxrlhf import config` imports the module jaxrlhf.config
                for alias in node.names:
                    found.append((node.lineno, f"jaxrlhf.{alias.name}", text))
            else:
                found.append((node.lineno, base, text))
    return found


def violations(path: Path, source: str) -> list[str]:
    """One line per upward (or banned) import in ``source``, the module at ``path``."""
    module = module_name(path)
    here = place(module)
    rel = path.relative_to(ROOT)
    if here not in LAYERS:
        return [f"{rel}: module {module} is not in the layer table of docs/architecture.md"]
    out = []
    tree = ast.parse(source, filename=str(path))
    for line, target, text in imported_modules(tree, module, path.name == "__init__.py"):
        there = place(target)
        if there is None or there == here:
            continue
        if there not in LAYERS:
            out.append(f"{rel}:{line}: {text} -- {there}")
        elif LAYERS[there] > LAYERS[here]:
            out.append(
                f"{rel}:{line}: {text} -- layer {LAYERS[here]} ({here}) imports upward from "
                f"layer {LAYERS[there]} ({there})"
            )
        elif there in NEVER[here]:
            out.append(f"{rel}:{line}: {text} -- {here} must never import {there}")
    return out


def test_the_table_covers_the_package() -> None:
    assert LAYERS["errors.py"] == 0 and LAYERS["config/"] == 2 and LAYERS["cli.py"] == 7
    assert NEVER["interfaces/"] == ("config/",)
    for path in PACKAGE.iterdir():
        if path.name == "__pycache__" or not (path.is_dir() or path.suffix == ".py"):
            continue
        entry = f"{path.name}/" if path.is_dir() else path.name
        assert entry in LAYERS, f"jaxrlhf/{entry} has no layer in docs/architecture.md"


def test_no_import_runs_upward() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += violations(path, path.read_text(encoding="utf-8"))
    assert not found, "imports that break the layering:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        (
            "jaxrlhf/models/x.py",
            "import os\n\ndef f():\n    from jaxrlhf.system.coordinator import PPOCoordinator\n",
            "jaxrlhf/models/x.py:4: from jaxrlhf.system.coordinator import PPOCoordinator -- "
            "layer 3 (models/) imports upward from layer 6 (system/)",
        ),
        (
            "jaxrlhf/config/x.py",
            "from jaxrlhf import dfg\n",
            "jaxrlhf/config/x.py:1: from jaxrlhf import dfg -- layer 2 (config/) imports upward "
            "from layer 5 (dfg.py)",
        ),
        (
            "jaxrlhf/data/x.py",
            "from .. import cli\n",
            "jaxrlhf/data/x.py:1: from .. import cli -- layer 3 (data/) imports upward from "
            "layer 7 (cli.py)",
        ),
        (
            "jaxrlhf/interfaces/x.py",
            "import jaxrlhf.config.schema as s\n",
            "jaxrlhf/interfaces/x.py:1: import jaxrlhf.config.schema -- interfaces/ must never "
            "import config/",
        ),
        ("jaxrlhf/algorithms/x.py", "from jaxrlhf.registry import Registry\n", None),
        ("jaxrlhf/system/x.py", "from jaxrlhf.config import Config\nimport jax\n", None),
    ],
)
def test_the_checker_finds_upward_imports(path: str, source: str, expected: str | None) -> None:
    assert violations(ROOT / path, source) == ([] if expected is None else [expected])
