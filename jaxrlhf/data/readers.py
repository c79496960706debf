"""Raw prompt rows from JSONL, Parquet, HF `datasets` and the built-in tasks.

A source is named by one string (``data.train_path`` / ``data.eval_path``):

- ``None`` or a task name (``"arithmetic"``): a built-in synthetic task (no download);
- ``*.jsonl`` / ``*.json`` (JSON lines or one JSON array; optionally ``.gz``) and
  ``*.parquet`` files, or a directory of such files (read in name order);
- a directory written by `datasets.Dataset.save_to_disk` (a ``DatasetDict`` gives its split);
- ``hf:NAME[?config=C&split=S]`` or a bare ``owner/name`` that is not a local path: a dataset
  loaded with `datasets.load_dataset` (a hub name when online, or a local loading script/dir).

Readers only parse: each row comes back with where it was found, so that later checks can name
the file and line of a bad row. A row that cannot be parsed carries an error instead of fields.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxrlhf.data.tasks import ArithmeticTask
from jaxrlhf.errors import DataError
from jaxrlhf.registry import Registry

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TOY_DATASET_SIZE = 1024  # problems in a built-in task's pool (one epoch)

# Built-in tasks: name -> factory of an object with `problems(n, seed)` (see `tasks.py`).
PROMPT_TASKS: Registry[Callable[[], Any]] = Registry("prompt task")
PROMPT_TASKS.register("arithmetic", ArithmeticTask)


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One row as read: ``fields`` (None when unparseable, with ``error`` saying why) and
    ``where`` it was found (``"file.jsonl:17"``, ``"file.parquet row 3"``)."""

    where: str
    fields: Mapping[str, Any] | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    """A named stream of rows. ``keys`` overrides the configured prompt / answer keys (built-in
    tasks always use ``prompt`` / ``answer``)."""

    name: str
    rows: Iterator[RawRow]
    keys: tuple[str, str] | None = None


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def _read_json_array(path: Path, text: bytes) -> Iterator[RawRow]:
    try:
        items = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a valid JSON array ({e}).") from e
    for i, obj in enumerate(items, start=1):
        where = f"{path} item {i}"
        if isinstance(obj, dict):
            yield RawRow(where, obj)
        else:
            yield RawRow(where, None, f"expected a JSON object, got {type(obj).__name__}")


def read_jsonl(path: str | os.PathLike) -> Iterator[RawRow]:
    """One row per non-blank line; a line that is not a JSON object is an error row.

    A file whose content is one JSON array of objects is read as one row per element. A file
    that cannot be read to its end (a truncated or corrupt ``.gz``, an I/O error) is a
    `DataError` naming it and the last line read.
    """
    path = Path(path)
    after = ""
    try:
        for row in _jsonl_rows(path):
            after = f" after line {row.where.removeprefix(f'{path}:')}"
            yield row
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        kind = "truncated or corrupt" if path.name.endswith(".gz") else "unreadable"
        raise DataError(f"{path} is {kind}: reading failed{after} ({_describe(e)}).") from None


def _describe(e: BaseException) -> str:
    """``"EOFError: Compressed file ended ..."`` (the type alone when the message is empty)."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            yield from _read_json_array(path, f.read())
            return
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8").strip())
            except UnicodeDecodeError as e:
                yield RawRow(where, None, f"not UTF-8 (byte {e.start + 1})")
                continue
            except json.JSONDecodeError as e:
                yield RawRow(where, None, f"unparseable JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield RawRow(where, None, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield RawRow(where, obj)


def _check_columns(name: str, available: Sequence[str], columns: Sequence[str]) -> list[str]:
    """The top-level ``columns`` to read; a missing one is a config error, not a bad row."""
    wanted = list(dict.fromkeys(c.split(".")[0] if c not in available else c for c in columns))
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(
            f"{name} has no column {missing[0]!r} (data.prompt_key / data.answer_key); "
            f"columns are {sorted(available)}."
        )
    return wanted


def read_parquet(path: str | os.PathLike, columns: Sequence[str]) -> Iterator[RawRow]:
    """Rows of a Parquet file with every column (the ones past ``columns``, the top-level names
    of the keys, reach reward functions as metadata); a missing key column is an error."""
    import pyarrow as pa  # imported here: only Parquet sources need pyarrow
    import pyarrow.parquet as pq

    path = Path(path)
    index = 0
    try:
        pf = pq.ParquetFile(path)
        _check_columns(str(path), pf.schema_arrow.names, columns)
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                index += 1
                yield RawRow(f"{path} row {index}", row)
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid: a bad footer, page or schema
        after = f" after row {index}" if index else ""
        raise DataError(
            f"{path} is not a readable Parquet file{after} ({_describe(e)}); expected a "
            "complete file written by pyarrow / pandas."
        ) from None


def _hf_rows(name: str, ds: Any, columns: Sequence[str]) -> Iterator[RawRow]:
    _check_columns(name, ds.column_names, columns)
    names = list(ds.column_names)
    index = 0
    for batch in ds.iter(batch_size=1024):
        for values in zip(*(batch[c] for c in names), strict=True):
            index += 1
            yield RawRow(f"{name} row {index}", dict(zip(names, values, strict=True)))


def _pick_split(name: str, ds: Any, split: str) -> Any:
    """A `Dataset` from a `Dataset` or `DatasetDict`; ``eval`` falls back to test/validation."""
    if not hasattr(ds, "keys"):
        return ds
    candidates = [split] + (["test", "validation"] if split == "eval" else [])
    for c in candidates:
        if c in ds:
            return ds[c]
    raise DataError(f"{name} has no split {split!r}; splits are {sorted(ds.keys())}.")


def read_hf(spec: str, split: str, columns: Sequence[str]) -> tuple[str, Iterator[RawRow]]:
    """Rows of an HF dataset: a `save_to_disk` directory, or ``hf:NAME?config=C&split=S``."""
    import datasets  # imported here: only HF sources need the datasets package

    path = Path(spec)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = _pick_split(spec, datasets.load_from_disk(str(path)), split)
        return spec, _hf_rows(spec, ds, columns)
    parsed = urllib.parse.urlsplit(spec.removeprefix("hf:"))
    query = dict(urllib.parse.parse_qsl(parsed.query))
    unknown = set(query) - {"config", "split"}
    if unknown:
        raise DataError(f"{spec}: unknown option {sorted(unknown)[0]!r} (expected config, split).")
    hf_split = query.get("split", "test" if split == "eval" else split)
    if not Path(parsed.path).exists():  # a hub dataset: fail at once, not after the retries
        from jaxrlhf.models.hf_io import hub_offline_var, hub_unreachable

        unreachable = None if hub_offline_var("HF_DATASETS_OFFLINE") else hub_unreachable()
        if unreachable is not None:
            raise DataError(
                f"could not load HF dataset {spec!r}: {unreachable}; connect, or set "
                "HF_HUB_OFFLINE=1 to use the datasets cache."
            )
    try:
        ds = datasets.load_dataset(parsed.path, query.get("config"), split=hf_split)
    except Exception as e:  # datasets raises many types; the user needs the path and the cause
        raise DataError(f"could not load HF dataset {spec!r} (split {hf_split!r}): {e}") from e
    return spec, _hf_rows(f"{spec}[{hf_split}]", ds, columns)


def read_task(name: str, split: str, seed: int, size: int = TOY_DATASET_SIZE) -> Source:
    """``size`` problems of a built-in task's split (its eval problems never occur in train)."""
    task = PROMPT_TASKS.get(name)()
    if split == "eval":  # the whole held-out split, once, in a fixed order
        problems = task.all_problems("eval")
    else:
        problems = task.problems(size, seed=seed, split="train")
    rows = (
        RawRow(f"task:{name} #{i + 1}", {"prompt": p.prompt, "answer": p.answer})
        for i, p in enumerate(problems)
    )
    return Source(f"task:{name}", rows, keys=("prompt", "answer"))


def _read_dir(path: Path, columns: Sequence[str]) -> Iterator[RawRow]:
    files = sorted(p for p in path.iterdir() if _has_suffix(p, JSONL_SUFFIXES + PARQUET_SUFFIXES))
    if not files:
        raise DataError(f"{path} holds no .jsonl / .json / .parquet files and no HF dataset.")
    for f in files:
        yield from read_jsonl(f) if _has_suffix(f, JSONL_SUFFIXES) else read_parquet(f, columns)


def open_source(
    spec: str | None,
    *,
    split: str,
    columns: Sequence[str],
    seed: int = 0,
    task_size: int = TOY_DATASET_SIZE,
) -> Source:
    """The rows named by ``spec`` (see the module docstring); ``columns`` are the keys needed."""
    if spec is None:
        return read_task("arithmetic", split, seed, task_size)
    path = Path(spec)
    if path.is_file():
        if _has_suffix(path, JSONL_SUFFIXES):
            return Source(spec, read_jsonl(path))
        if _has_suffix(path, PARQUET_SUFFIXES):
            return Source(spec, read_parquet(path, columns))
        raise DataError(f"{spec}: unknown file type (expected .jsonl, .json, .parquet).")
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return Source(*read_hf(spec, split, columns))
        return Source(spec, _read_dir(path, columns))
    if spec in PROMPT_TASKS.names():
        return read_task(spec, split, seed, task_size)
    if spec.startswith("hf:") or (spec.count("/") == 1 and not Path(spec).suffix):
        return Source(*read_hf(spec, split, columns))
    raise DataError(
        f"dataset {spec!r} is not a file, a directory, a built-in task "
        f"({', '.join(PROMPT_TASKS.names())}) or an HF dataset name (hf:owner/name)."
    )
