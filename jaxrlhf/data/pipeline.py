"""Prompt pipelines: a grain dataset of fixed-shape prompt batches with an exact, JSON-able cursor.

    tok = load_tokenizer(cfg.data.tokenizer or cfg.actor.path)
    pipe = build_prompt_pipeline(cfg.data, tok, seed=cfg.experiment.seed)
    it = pipe.iterator()                  # or pipe.iterator(saved_state) to resume
    batch = next(it)                      # PromptBatch: this process's rows of global batch 0
    state = it.get_state()                # JSON-able; goes into the checkpoint

Every process builds the same global stream — row order shuffled per epoch from the seed,
epochs concatenated, cut into global batches of ``data.batch_size`` — and keeps its own
contiguous slice of each batch. The stream therefore does not depend on the process count, and
the cursor (the index of the next global batch) is the same on every process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Literal

import grain
import jax
import numpy as np

from jaxrlhf.config import DataConfig
from jaxrlhf.data.readers import PROMPT_TASKS, TOY_DATASET_SIZE, DataError, open_source
from jaxrlhf.data.records import DataStats, PromptTable, build_table
from jaxrlhf.errors import ConfigError

__all__ = [
    "DataError",
    "DataStats",
    "PromptBatch",
    "PromptIterator",
    "PromptPipeline",
    "build_prompt_pipeline",
    "load_tokenizer",
]

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """This process's rows of one global batch, left-padded to ``max_prompt_len``."""

    input_ids_bt: np.ndarray  # int32 [B_local, T]; pad id on the left
    attention_mask_bt: np.ndarray  # int32 [B_local, T]; 1 at prompt tokens
    prompts: tuple[str, ...]  # rendered prompt text (chat template applied)
    answers: tuple[str, ...]
    row_ids_b: np.ndarray  # int64: index of each row in the dataset
    sample_ids_b: np.ndarray  # int64: position in the global stream (unique within a run)
    step: int  # index of the global batch (0-based)
    metadata: tuple[dict[str, Any], ...] = ()  # each row's other fields, for reward functions

    def __len__(self) -> int:
        return len(self.prompts)

    def row_metadata(self, i: int) -> dict[str, Any] | None:
        """Row ``i``'s other dataset fields; None for a batch built without them."""
        return self.metadata[i] if self.metadata else None


def load_tokenizer(name_or_path: str | None, key: str = "data.tokenizer") -> Any:
    """An HF tokenizer by local path or hub name (``key``: the config key naming it, for
    errors); None: the built-in character tokenizer. A directory without tokenizer files, or
    one transformers cannot read, is a `ConfigError` naming ``key`` and the directory."""
    if name_or_path is None:
        from jaxrlhf.data.tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    from transformers import AutoTokenizer

    from jaxrlhf.models.config import read_hf_config
    from jaxrlhf.models.hf_io import TOKENIZER_FILES, resolve_model_dir

    path = resolve_model_dir(name_or_path, key)
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{key}: {path} has no tokenizer files; expected one of {', '.join(TOKENIZER_FILES)} "
            "(or set data.tokenizer to a tokenizer directory)."
        )
    if os.path.isfile(os.path.join(path, "config.json")):
        read_hf_config(path, key)  # transformers reads it too: an invalid one is named here
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # transformers' "can't load" / bad tokenizer files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}: cannot load the tokenizer in {path} ({first}).") from None


def _option(cfg: DataConfig, name: str, value: Any, default: Any) -> Any:
    """An explicit argument, else the config field if the config has it, else the default."""
    if value is not None:
        return value
    configured = getattr(cfg, name)
    return default if configured is None else configured


class PromptIterator:
    """Yields `PromptBatch`es; ``get_state`` / ``set_state`` save and restore the position."""

    def __init__(self, pipeline: PromptPipeline, dataset: grain.MapDataset) -> None:
        self._pipeline = pipeline
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        self._it = iter(dataset.to_iter_dataset(options))

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> PromptBatch:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """The position as a JSON-able dict (identical on every process)."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self._pipeline.fingerprint,
            "grain": self._it.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state saved over other data or settings."""
        if state.get("version") != STATE_VERSION or "grain" not in state:
            raise DataError(f"not a prompt-iterator state (version {STATE_VERSION}): {state!r}.")
        if state.get("fingerprint") != self._pipeline.fingerprint:
            raise DataError(
                "the saved data-iterator state belongs to another dataset or other data settings "
                f"(fingerprint {state.get('fingerprint')} != {self._pipeline.fingerprint}); "
                "resume with the same data, tokenizer, batch size, seed and shuffle settings."
            )
        self._it.set_state(state["grain"])

    @property
    def next_step(self) -> int:
        """Index of the global batch the next call returns."""
        return int(self._it.get_state()["next_index"])


@dataclasses.dataclass(frozen=True, eq=False)
class PromptPipeline:
    """A validated prompt table plus the batching / shuffling / sharding recipe."""

    table: PromptTable
    stats: DataStats
    batch_size: int  # global prompts per batch
    max_prompt_len: int
    pad_id: int
    seed: int
    shuffle: bool
    num_epochs: int | None  # None: repeat forever
    drop_remainder: bool
    process_index: int
    process_count: int

    @functools.cached_property
    def fingerprint(self) -> str:
        """Content + settings that decide the global stream. Not the process layout, and not
        ``num_epochs`` (a resumed run may be given more epochs: the stream so far is the same)."""
        settings = (self.batch_size, self.seed, self.shuffle, self.drop_remainder)
        digest = hashlib.sha256(repr(settings).encode()).hexdigest()[:8]
        return f"{self.table.fingerprint}-{digest}"

    @property
    def num_batches(self) -> int | None:
        """Global batches in the stream; None when it repeats forever."""
        if self.num_epochs is None:
            return None
        total = len(self.table) * self.num_epochs
        return total // self.batch_size if self.drop_remainder else -(-total // self.batch_size)

    def dataset(self) -> grain.MapDataset:
        """The grain dataset of `PromptBatch`es for this process."""
        ds = grain.MapDataset.range(len(self.table))
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed)  # reshuffled every epoch by `repeat`
        if self.num_epochs != 1:
            ds = ds.repeat(self.num_epochs)
        ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder)
        return ds.map_with_index(self._collate)

    def iterator(self, state: dict[str, Any] | None = None) -> PromptIterator:
        """A fresh iterator, positioned at ``state`` when given."""
        it = PromptIterator(self, self.dataset())
        if state is not None:
            it.set_state(state)
        return it

    def _collate(self, step: int, row_ids: np.ndarray) -> PromptBatch:
        n_global = len(row_ids)
        first = step * self.batch_size
        parts = np.array_split(np.arange(n_global), self.process_count)
        local = parts[self.process_index]
        ids_b = np.asarray(row_ids, np.int64)[local]
        tokens = np.full((len(local), self.max_prompt_len), self.pad_id, np.int32)
        mask = np.zeros_like(tokens)
        for i, r in enumerate(ids_b):
            seq = self.table.token_ids[r]
            tokens[i, self.max_prompt_len - len(seq) :] = seq
            mask[i, self.max_prompt_len - len(seq) :] = 1
        return PromptBatch(
            input_ids_bt=tokens,
            attention_mask_bt=mask,
            prompts=tuple(self.table.prompts[r] for r in ids_b),
            answers=tuple(self.table.answers[r] for r in ids_b),
            row_ids_b=ids_b,
            sample_ids_b=first + local.astype(np.int64),
            step=step,
            metadata=tuple(self.table.metadata[r] for r in ids_b),
        )


def build_prompt_pipeline(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    split: Literal["train", "eval"] = "train",
    seed: int = 0,
    strict: bool | None = None,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    task_size: int = TOY_DATASET_SIZE,
) -> PromptPipeline:
    """The prompt pipeline for ``split`` (``data.train_path`` or ``data.eval_path``).

    Train: shuffled with ``seed`` (if ``data.shuffle``), ``num_epochs`` passes (None: forever),
    full batches only. Eval: one pass in file order, the last batch may be short. ``strict``
    and ``num_epochs`` default to ``data.strict`` / ``data.num_epochs`` when the config has them.
    """
    train = split == "train"
    path = cfg.train_path if train else cfg.eval_path
    if not train and path is None:  # a built-in task has its own eval split; a file has none
        if cfg.train_path is not None and cfg.train_path not in PROMPT_TASKS.names():
            raise DataError("data.eval_path is not set (there is no eval split of a file).")
        path = cfg.train_path
    p_index = jax.process_index() if process_index is None else process_index
    p_count = jax.process_count() if process_count is None else process_count
    if train and cfg.batch_size % p_count:
        raise DataError(
            f"data.batch_size {cfg.batch_size} is not divisible by the {p_count} processes."
        )
    source = open_source(
        path,
        split="train" if train else "eval",
        columns=(cfg.prompt_key, cfg.answer_key),
        seed=seed,
        task_size=task_size,
    )
    table, stats = build_table(
        source,
        tokenizer,
        prompt_key=cfg.prompt_key,
        answer_key=cfg.answer_key,
        max_prompt_len=cfg.max_prompt_len,
        apply_chat_template=cfg.apply_chat_template,
        strict=bool(_option(cfg, "strict", strict, False)),
    )
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    epochs = _option(cfg, "num_epochs", num_epochs, None) if train else 1
    pipe = PromptPipeline(
        table=table,
        stats=stats,
        batch_size=cfg.batch_size,
        max_prompt_len=cfg.max_prompt_len,
        pad_id=int(pad_id),
        seed=seed,
        shuffle=cfg.shuffle and train,
        num_epochs=epochs,
        drop_remainder=train,
        process_index=p_index,
        process_count=p_count,
    )
    if p_count > 1 and process_count is None:
        _check_same_everywhere(pipe.fingerprint)
    if train and pipe.num_batches == 0:
        raise DataError(
            f"{stats.source}: {len(table)} usable prompts x {epochs} epochs is less than one "
            f"batch of data.batch_size {cfg.batch_size}."
        )
    return pipe


def _check_same_everywhere(fingerprint: str) -> None:
    """Fail fast if processes built different datasets (their batches would not line up)."""
    from jax.experimental import multihost_utils

    # int32 words: without jax_enable_x64 a broadcast int64 would be truncated and never match.
    value = np.frombuffer(bytes.fromhex(fingerprint.replace("-", "")[:16]), np.int32)
    multihost_utils.assert_equal(value, f"prompt datasets differ across processes ({fingerprint})")
