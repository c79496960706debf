"""Validated, tokenized prompts: field mapping, chat templates, length filter, bad-row accounting.

Every row is checked once, up front, when a pipeline is built: prompt datasets are small
(thousands to a few million short rows), and validating eagerly gives the bad-row count and the
epoch length before the first step, and the same clean table on every process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxrlhf.data.readers import DataError, RawRow, Source

logger = logging.getLogger(__name__)

_MISSING = object()
_TOKENIZE_CHUNK = 512


@dataclasses.dataclass
class DataStats:
    """Rows read, kept and skipped (by reason: ``bad_json``, ``missing_key``, ``bad_value``,
    ``too_long``)."""

    source: str
    rows_read: int = 0
    kept: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)

    @property
    def bad_rows(self) -> int:
        return sum(self.skipped.values())

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat numbers for the metric logger."""
        out = {f"{prefix}rows_kept": float(self.kept), f"{prefix}bad_rows": float(self.bad_rows)}
        out.update({f"{prefix}skipped_{k}": float(v) for k, v in sorted(self.skipped.items())})
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class PromptTable:
    """The clean dataset: rendered prompt text, answer, token ids, origin and the other fields
    of each row (``metadata``: the row minus its prompt and answer keys, for reward functions)."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    token_ids: tuple[np.ndarray, ...]  # int32 [len_i] each
    where: tuple[str, ...]
    metadata: tuple[dict[str, Any], ...]

    def __len__(self) -> int:
        return len(self.prompts)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of the content, to refuse resuming a data iterator on other data."""
        h = hashlib.sha256()
        for text, answer, ids in zip(self.prompts, self.answers, self.token_ids, strict=True):
            h.update(text.encode())
            h.update(b"\0")
            h.update(answer.encode())
            h.update(b"\0")
            h.update(ids.tobytes())
        return h.hexdigest()[:16]


def get_field(row: Mapping[str, Any], key: str) -> Any:
    """``row[key]``, or a nested lookup for a dotted key (``"reward_model.ground_truth"``)."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


class _Checker:
    """Counts bad rows, warns about the first few, raises on the first one in strict mode."""

    def __init__(self, stats: DataStats, strict: bool, max_warnings: int) -> None:
        self.stats, self.strict, self.max_warnings = stats, strict, max_warnings

    def bad(self, where: str, reason: str, message: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {message} (data.strict is true).")
        self.stats.skipped[reason] += 1
        if self.stats.bad_rows <= self.max_warnings:
            logger.warning("%s: %s; row skipped.", where, message)


def _render(
    row: RawRow, keys: tuple[str, str], tokenizer: Any, chat_template: bool, check: _Checker
) -> tuple[str, str, bool, dict[str, Any]] | None:
    """The prompt text, answer, whether a chat template rendered it and the row's other fields;
    None for a bad row."""
    if row.fields is None:
        check.bad(row.where, "bad_json", row.error or "unparseable row")
        return None
    prompt, answer = get_field(row.fields, keys[0]), get_field(row.fields, keys[1])
    for key, value in zip(keys, (prompt, answer), strict=True):
        if value is _MISSING or value is None:
            check.bad(row.where, "missing_key", f"missing key {key!r}")
            return None
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        check.bad(row.where, "bad_value", f"answer {keys[1]!r} is a {type(answer).__name__}")
        return None
    templated = _is_messages(prompt) or (chat_template and isinstance(prompt, str))
    if templated:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
    if not isinstance(prompt, str) or not prompt.strip():
        what = "empty" if isinstance(prompt, str) else f"a {type(prompt).__name__}"
        check.bad(row.where, "bad_value", f"prompt {keys[0]!r} is {what}")
        return None
    metadata = {k: v for k, v in row.fields.items() if k not in keys}
    return prompt, str(answer), templated, metadata


def _encode(tokenizer: Any, texts: list[str], templated: list[bool]) -> list[list[int]]:
    """Token ids in order; templated texts get no extra special tokens (the template has them)."""
    out: list[list[int]] = [[] for _ in texts]
    for flag in (False, True):
        idx = [i for i, t in enumerate(templated) if t == flag]
        if idx:
            ids = tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
            for i, row_ids in zip(idx, ids, strict=True):
                out[i] = row_ids
    return out


def build_table(
    source: Source,
    tokenizer: Any,
    *,
    prompt_key: str,
    answer_key: str,
    max_prompt_len: int,
    apply_chat_template: bool = False,
    strict: bool = False,
    max_warnings: int = 10,
) -> tuple[PromptTable, DataStats]:
    """Read, render, tokenize and length-filter every row of ``source``.

    Bad rows are skipped and counted (a warning names the file and line of the first
    ``max_warnings``); with ``strict`` the first one raises `DataError`. A prompt that is a
    list of chat messages is always rendered with the tokenizer's chat template.
    """
    keys = source.keys or (prompt_key, answer_key)
    stats = DataStats(source.name)
    check = _Checker(stats, strict, max_warnings)
    prompts: list[str] = []
    answers: list[str] = []
    token_ids: list[np.ndarray] = []
    where: list[str] = []
    metadata: list[dict[str, Any]] = []

    def flush(pending: list[tuple[str, str, bool, dict[str, Any], str]]) -> None:
        encoded = _encode(tokenizer, [p[0] for p in pending], [p[2] for p in pending])
        for (text, answer, _, meta, at), ids in zip(pending, encoded, strict=True):
            if len(ids) > max_prompt_len:
                check.bad(at, "too_long", f"prompt has {len(ids)} tokens > {max_prompt_len}")
                continue
            prompts.append(text)
            answers.append(answer)
            token_ids.append(np.asarray(ids, np.int32))
            where.append(at)
            metadata.append(meta)
        pending.clear()

    pending: list[tuple[str, str, bool, dict[str, Any], str]] = []
    for row in source.rows:
        stats.rows_read += 1
        rendered = _render(row, keys, tokenizer, apply_chat_template, check)
        if rendered is not None:
            pending.append((*rendered, row.where))
        if len(pending) >= _TOKENIZE_CHUNK:
            flush(pending)
    flush(pending)
    stats.kept = len(prompts)
    if stats.bad_rows:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items()))
        logger.warning(
            "%s: skipped %d of %d rows (%s).", source.name, stats.bad_rows, stats.rows_read, detail
        )
    if not prompts:
        raise DataError(f"{source.name}: no usable prompts ({stats.rows_read} rows read).")
    table = PromptTable(
        tuple(prompts), tuple(answers), tuple(token_ids), tuple(where), tuple(metadata)
    )
    return table, stats
