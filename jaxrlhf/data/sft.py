"""Supervised datasets: SFT examples (prompt + response, or chat messages) and preference pairs
(prompt + chosen / rejected) for reward-model training, tokenized with a loss mask.

Sources are named like prompt datasets (``data.train_path`` / ``data.eval_path``: JSONL, Parquet,
HF datasets, see `readers.py`); ``None`` or ``"arithmetic"`` is the built-in synthetic toy data:

- SFT: single-digit arithmetic, prompt ``"3+4="``, response ``"7"``; the eval split is a disjoint
  set of held-out problems;
- RM: pairs whose chosen response is the correct answer and rejected one a wrong answer; held-out
  pairs combine problems with wrong answers never paired with them in training.

Every row is checked up front. A row without a configured key, with an empty response or a value
of the wrong type is skipped and counted (``data.strict``: raised), with a message naming the row
and key; when the *first* row lacks a key the dataset (or the config) is wrong, which is raised.

Token layout of one example: ``prompt ids + response ids + EOS``, the prompt tokenized as the
prompt pipeline does (so a policy trained here sees the same ids in PPO). Chat rows are rendered
with the tokenizer's chat template and every assistant turn is a response span.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from jaxrlhf.config import Config
from jaxrlhf.data.readers import PROMPT_TASKS, DataError, RawRow, open_source
from jaxrlhf.data.records import _MISSING, DataStats, _Checker, get_field
from jaxrlhf.data.tasks import ArithmeticTask

__all__ = [
    "TOY_TASK",
    "ExampleTable",
    "PairExample",
    "SFTExample",
    "index_batch",
    "load_pair_table",
    "load_sft_table",
    "toy_pair_rows",
    "toy_sft_rows",
]

logger = logging.getLogger(__name__)

TOY_TASK = ArithmeticTask(eval_every=5)  # 160 train / 40 held-out problems
Split = Literal["train", "eval"]


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One tokenized sequence; ``loss_mask`` is 1 at response tokens (token-aligned)."""

    ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # float32 [T]; 0 at prompt tokens (and always at token 0)
    where: str


@dataclasses.dataclass(frozen=True)
class PairExample:
    """A preference pair: two full sequences (prompt + response + EOS) sharing a prompt."""

    chosen: np.ndarray  # int32
    rejected: np.ndarray  # int32
    where: str


@dataclasses.dataclass(frozen=True, eq=False)
class ExampleTable:
    """The clean examples of one split and the row accounting."""

    examples: tuple[Any, ...]
    stats: DataStats

    def __len__(self) -> int:
        return len(self.examples)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short content hash: a resumed run refuses a checkpoint made on other data."""
        h = hashlib.sha256()
        for ex in self.examples:
            for field in dataclasses.fields(ex):
                value = getattr(ex, field.name)
                if isinstance(value, np.ndarray):
                    h.update(value.tobytes())
                    h.update(b"\0")
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- toy data


def _is_toy(spec: str | None) -> bool:
    return spec is None or spec == "arithmetic"


def toy_sft_rows(split: Split, keys: tuple[str, str]) -> Iterator[RawRow]:
    """Every problem of the toy task's ``split`` as a prompt / response row."""
    for i, p in enumerate(TOY_TASK.all_problems(split)):
        yield RawRow(f"toy-sft:{split} #{i + 1}", {keys[0]: p.prompt, keys[1]: p.answer})


def toy_pair_rows(split: Split, keys: tuple[str, str, str]) -> Iterator[RawRow]:
    """(problem, wrong answer) pairs over every toy problem: chosen is the correct answer,
    rejected a wrong one in [-9, 18]. A fixed fifth of the combinations is held out (eval)."""
    values = [(a, op, b) for op in TOY_TASK.ops for a in range(10) for b in range(10)]
    n = 0
    for a, op, b in values:
        correct = a + b if op == "+" else a - b
        for wrong in range(-9, 19):
            if wrong == correct:
                continue
            held_out = (7 * a + 3 * b + 11 * wrong + (op == "-")) % 5 == 0
            if held_out == (split == "eval"):
                n += 1
                fields = {keys[0]: f"{a}{op}{b}=", keys[1]: str(correct), keys[2]: str(wrong)}
                yield RawRow(f"toy-rm:{split} #{n}", fields)


# ----------------------------------------------------------------------------- reading rows


def _open_rows(
    cfg: Config,
    tokenizer: Any,
    split: Split,
    columns: Sequence[Sequence[str]],
    names: str,
    toy: Any,
) -> tuple[str, Iterator[RawRow], DataStats, _Check, _Tokens] | None:
    """What a table loader needs: (name, rows, stats, bad-row check, tokenizer helper), or None
    when there is no eval split."""
    found = _source(cfg, split, columns, names, toy)
    if found is None:
        return None
    name, rows = found
    stats = DataStats(name)
    return name, rows, stats, _Check(stats, cfg.data.strict, max_warnings=10), _Tokens(tokenizer)


def _source(
    cfg: Config, split: Split, columns: Sequence[Sequence[str]], names: str, toy: Any
) -> tuple[str, Iterator[RawRow]] | None:
    """(name, rows) of ``split``; None when there is no eval split (a file without eval_path).
    ``columns``: the column sets a columnar source (Parquet, HF) is tried with, in order."""
    spec = cfg.data.train_path if split == "train" else cfg.data.eval_path
    if split == "eval" and spec is None:
        if not _is_toy(cfg.data.train_path):
            return None
        spec = cfg.data.train_path
    if _is_toy(spec):
        return f"toy:{split}", toy(split)
    if spec in PROMPT_TASKS.names():
        raise DataError(
            f"data.{split}_path {spec!r} is a prompt-only task; supervised training needs "
            "responses (use 'arithmetic' or a dataset file)."
        )
    for i, cols in enumerate(columns):
        source = open_source(spec, split=split, columns=cols)
        rows = iter(source.rows)
        try:
            first = next(rows)
        except StopIteration:
            raise DataError(f"{source.name} has no rows.") from None
        except DataError as e:  # a Parquet / HF source without these columns
            if i + 1 < len(columns):
                continue
            raise DataError(str(e).replace("data.prompt_key / data.answer_key", names)) from None
        return source.name, itertools.chain([first], rows)
    raise AssertionError("unreachable")


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value)


def _first_row_check(row: RawRow, keys: Mapping[str, str], any_of: bool = False) -> None:
    """The first row names the dataset's keys: one missing there is a config / dataset error."""
    if row.fields is None:
        return
    missing = [(k, cfg_key) for cfg_key, k in keys.items() if get_field(row.fields, k) is _MISSING]
    if missing and (not any_of or len(missing) == len(keys)):
        key, cfg_key = missing[0]
        raise DataError(
            f"{row.where}: the dataset has no key {key!r} ({cfg_key}); the first row has keys "
            f"{sorted(row.fields)}. Set {cfg_key} to the right column."
        )


class _Tokens:
    """Tokenization shared by SFT and pair rows (prompt as the prompt pipeline encodes it)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DataError("the tokenizer has no EOS token; responses must end with one.")

    def encode(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def chat(self, messages: list[dict], generation_prompt: bool = False) -> list[int]:
        text = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return self.encode(text, special=False)

    def prompt_response(
        self, prompt: Any, response: str, chat: bool, where: str = "?"
    ) -> tuple[list, list]:
        """(prompt ids, response ids) of one turn; chat: rendered by the template."""
        if isinstance(prompt, list) or chat:
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            msgs = [dict(m) for m in msgs]
            head = self.chat(msgs, generation_prompt=True)
            full = self.chat([*msgs, {"role": "assistant", "content": response}])
            if full[: len(head)] != head:
                raise DataError(
                    f"{where}: the tokenizer's chat template does not render the prompt as a "
                    "prefix of the prompt + response, so the response tokens cannot be found."
                )
            return head, full[len(head) :]
        return self.encode(prompt, special=True), [*self.encode(response, False), self.eos]

    def conversation(self, messages: list[dict]) -> tuple[list[int], list[float]]:
        """Ids of a whole chat and a mask marking every assistant turn."""
        msgs = [dict(m) for m in messages]
        ids = self.chat(msgs)
        mask = [0.0] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start = len(self.chat(msgs[:i], generation_prompt=True)) if i else 0
            end = len(self.chat(msgs[: i + 1]))
            mask[start:end] = [1.0] * (end - start)
        return ids, mask


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


class _Check(_Checker):
    """`_Checker` that remembers the first problem, for the "no usable rows" error."""

    first: str | None = None

    def bad(self, where: str, reason: str, message: str) -> None:
        self.first = self.first or f"{where}: {message}"
        super().bad(where, reason, message)


def _finish(name: str, check: _Check, examples: list, what: str) -> ExampleTable:
    stats = check.stats
    stats.kept = len(examples)
    if stats.bad_rows:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items()))
        logger.warning("%s: skipped %d of %d rows (%s).", name, stats.bad_rows, stats.rows_read,
                       detail)  # fmt: skip
    if not examples:
        first = f"; the first bad row is {check.first}" if check.first else ""
        raise DataError(f"{name}: no usable {what} ({stats.rows_read} rows read){first}.")
    return ExampleTable(tuple(examples), stats)


def load_sft_table(cfg: Config, tokenizer: Any, split: Split = "train") -> ExampleTable | None:
    """Tokenized SFT examples of ``split`` (None: no eval data). A row is either
    ``{data.prompt_key, sft.response_key}`` (the prompt may be a message list) or
    ``{sft.messages_key: [{role, content}, ...]}``."""
    d, s = cfg.data, cfg.sft
    keys = {"data.prompt_key": d.prompt_key, "sft.response_key": s.response_key}
    toy = lambda sp: toy_sft_rows(sp, (d.prompt_key, s.response_key))
    cols = ((d.prompt_key, s.response_key), (s.messages_key,))
    names = "data.prompt_key / sft.response_key / sft.messages_key"
    opened = _open_rows(cfg, tokenizer, split, cols, names, toy)
    if opened is None:
        return None
    name, rows, stats, check, tokens = opened
    examples: list[SFTExample] = []
    for row in rows:
        stats.rows_read += 1
        if stats.rows_read == 1 and row.fields is not None and s.messages_key not in row.fields:
            _first_row_check(row, keys)
        if row.fields is None:
            check.bad(row.where, "bad_json", row.error or "unparseable row")
            continue
        msgs = get_field(row.fields, s.messages_key)
        if msgs is not _MISSING and msgs is not None:
            if not _is_messages(msgs) or not any(m["role"] == "assistant" for m in msgs):
                check.bad(row.where, "bad_value", f"{s.messages_key!r} is not a chat with an "
                          "assistant turn (a list of {role, content})")  # fmt: skip
                continue
            ids, mask = tokens.conversation(msgs)
        else:
            prompt = get_field(row.fields, d.prompt_key)
            response = _text(get_field(row.fields, s.response_key))
            if prompt is _MISSING or prompt is None:
                check.bad(row.where, "missing_key", f"missing key {d.prompt_key!r}")
                continue
            if response is None or not response.strip():
                what = "missing or not text" if response is None else "empty"
                check.bad(row.where, "bad_value", f"response {s.response_key!r} is {what}")
                continue
            if not (_is_messages(prompt) or (isinstance(prompt, str) and prompt.strip())):
                check.bad(row.where, "bad_value", f"prompt {d.prompt_key!r} is empty or not text")
                continue
            head, tail = tokens.prompt_response(prompt, response, d.apply_chat_template, row.where)
            ids, mask = head + tail, [0.0] * len(head) + [1.0] * len(tail)
        if len(ids) > s.max_seq_len:
            check.bad(row.where, "too_long", f"{len(ids)} tokens > sft.max_seq_len {s.max_seq_len}")
            continue
        mask_t = np.asarray(mask, np.float32)
        mask_t[0] = 0.0  # token 0 has no log-prob (nothing precedes it)
        if len(ids) < 2 or not mask_t.any():
            check.bad(row.where, "bad_value", "no response tokens")
            continue
        examples.append(SFTExample(np.asarray(ids, np.int32), mask_t, row.where))
    return _finish(name, check, examples, "SFT examples")


def load_pair_table(cfg: Config, tokenizer: Any, split: Split = "train") -> ExampleTable | None:
    """Tokenized preference pairs of ``split`` (None: no eval data). A row is
    ``{data.prompt_key, rm.chosen_key, rm.rejected_key}`` with text responses, or, without a
    prompt, chosen / rejected chat-message lists (the conversation up to the last assistant turn
    is the prompt)."""
    d, r = cfg.data, cfg.rm
    keys = {"rm.chosen_key": r.chosen_key, "rm.rejected_key": r.rejected_key}
    toy = lambda sp: toy_pair_rows(sp, (d.prompt_key, r.chosen_key, r.rejected_key))
    cols = ((d.prompt_key, r.chosen_key, r.rejected_key), (r.chosen_key, r.rejected_key))
    names = "data.prompt_key / rm.chosen_key / rm.rejected_key"
    opened = _open_rows(cfg, tokenizer, split, cols, names, toy)
    if opened is None:
        return None
    name, rows, stats, check, tokens = opened
    examples: list[PairExample] = []
    for row in rows:
        stats.rows_read += 1
        if stats.rows_read == 1:
            _first_row_check(row, keys)
        if row.fields is None:
            check.bad(row.where, "bad_value", row.error or "unparseable row")
            continue
        chosen, rejected = (get_field(row.fields, k) for k in (r.chosen_key, r.rejected_key))
        prompt = get_field(row.fields, d.prompt_key)
        seqs: list[np.ndarray] = []
        for key, value in ((r.chosen_key, chosen), (r.rejected_key, rejected)):
            if value is _MISSING or value is None:
                check.bad(row.where, "missing_key", f"missing key {key!r}")
                break
            if _is_messages(value) and prompt is _MISSING:
                turns = [dict(m) for m in value]
                if turns[-1]["role"] != "assistant" or not str(turns[-1]["content"]).strip():
                    check.bad(row.where, "bad_value", f"{key!r} does not end with a non-empty "
                              "assistant turn")  # fmt: skip
                    break
                answer = str(turns[-1]["content"])
                head, tail = tokens.prompt_response(turns[:-1], answer, True, row.where)
            else:
                text = _text(value)
                if prompt is _MISSING or prompt is None:
                    check.bad(row.where, "missing_key", f"missing key {d.prompt_key!r}")
                    break
                if text is None or not text.strip():
                    what = "not text" if text is None else "empty"
                    check.bad(row.where, "bad_value", f"response {key!r} is {what}; a pair "
                              "needs two non-empty responses")  # fmt: skip
                    break
                head, tail = tokens.prompt_response(prompt, text, d.apply_chat_template, row.where)
            if len(head) + len(tail) > r.max_seq_len:
                n = len(head) + len(tail)
                check.bad(row.where, "too_long", f"{key!r} has {n} tokens > rm.max_seq_len "
                          f"{r.max_seq_len}")  # fmt: skip
                break
            seqs.append(np.asarray(head + tail, np.int32))
        if len(seqs) == 2:
            examples.append(PairExample(seqs[0], seqs[1], row.where))
    return _finish(name, check, examples, "preference pairs")


# ----------------------------------------------------------------------------- batching


def index_batch(n: int, batch_size: int, step: int, *, seed: int, shuffle: bool) -> np.ndarray:
    """Row indices of global batch ``step`` (0-based) of the stream: epochs of ``n`` rows, each
    permuted from (``seed``, epoch) when ``shuffle``, concatenated and cut into ``batch_size``
    rows. A pure function of ``step``, so the cursor of an exact resume is the step count."""
    start = step * batch_size
    out = np.empty(batch_size, np.int64)
    for i, pos in enumerate(range(start, start + batch_size)):
        epoch, offset = divmod(pos, n)
        out[i] = _epoch_order(n, seed, epoch, shuffle)[offset]
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng((seed, epoch)).permutation(n)
