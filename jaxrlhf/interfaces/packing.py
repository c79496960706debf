"""First-fit-decreasing sequence packing into fixed-shape micro-batches (host side, NumPy).

A `PackedBatch` of M micro-batches holds two views of the same sequences:

- **rows** ``[M, R, L]`` (``input_ids``, ``positions``, ``segment_ids``): what the model runs on.
  Whole sequences sit back to back in rows of L tokens; within a row they get segment ids
  1, 2, ... (0 = padding) and positions restarting at 0, so attention never crosses sequences.
- **grid** ``[M, S, T]``: one slot per sequence (S per micro-batch), token-aligned: entry
  ``[m, s, t]`` belongs to token t of the sequence in slot s. ``token_index`` says where that
  token sits in the micro-batch's rows (flattened ``r * L + l``), ``seq_lens`` ``[M, S]`` how
  long the sequence is (0 for an empty slot). Per-token fields (``loss_mask``, ``advantages``,
  ``old_logp``, ...) live on the grid, 0 beyond each length and in empty slots. Losses run on
  the grid, so "a row is a sequence" (sequence-mean aggregation, GSPO) stays true under packing.

Shift: the log-prob (or value) of token t comes from the model output at position t − 1 and is
stored at grid position t, aligned with the token it scores. Token 0 of a sequence has none,
so ``loss_mask`` must be 0 there.

Static shapes: the row length L (and T) is rounded up by `bucket_size` (2^k, 3·2^k), the counts
M and S to powers of two, so that a few compiled steps serve many batches. Filler micro-batches
and slots are all-masked: they change nothing, and steps skip empty micro-batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

ROW_KEYS = ("input_ids", "positions", "segment_ids")
INDEX_KEYS = ("token_index", "seq_lens")
MASK_FIELD = "loss_mask"


def power_of_two(n: int) -> int:
    """Smallest power of two >= ``n`` (the default bucket of counts: M and S)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def bucket_size(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3·2^k) that is >= ``n``: the
    default bucket of lengths, where padding costs compute (at most a third)."""
    if n <= 1:
        return 1
    power = 1 << (int(n) - 1).bit_length()  # smallest power of two >= n
    three_quarters = 3 * power // 4
    return three_quarters if three_quarters >= n else power


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Packed sequences ready for the device (see the module docstring for the layout).

    ``arrays``: rows ``input_ids`` / ``positions`` / ``segment_ids`` ``[M, R, L]`` int32,
    ``token_index`` ``[M, S, T]`` int32, ``seq_lens`` ``[M, S]`` int32 and per-token fields
    ``[M, S, T]`` float32. ``seq_index`` ``[M, S]``: which input sequence fills each slot
    (−1: empty); it stays on the host.
    """

    arrays: dict[str, np.ndarray]
    seq_index: np.ndarray

    @property
    def num_microbatches(self) -> int:
        return int(self.arrays["input_ids"].shape[0])

    @property
    def num_sequences(self) -> int:
        return int(np.sum(self.seq_index >= 0))

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(k for k in self.arrays if k not in ROW_KEYS + INDEX_KEYS)

    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Hashable (key, shape) signature: compiled steps are cached on it."""
        return tuple(sorted((k, tuple(v.shape)) for k, v in self.arrays.items()))

    def real_tokens(self) -> int:
        """Tokens of real sequences (what packing avoids padding)."""
        return int(np.sum(self.arrays["seq_lens"]))

    def row_tokens(self) -> int:
        """Tokens the model computes, padding included."""
        return int(self.arrays["input_ids"].size)


def _as_1d(x: ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}.")
    return arr


def _first_fit_decreasing(
    lengths: Sequence[int], row_len: int, rows_per_mb: int, one_per_row: bool
) -> list[list[list[int]]]:
    """Sequences (by index) into micro-batches of rows; longest first, each into the first row
    of the first micro-batch with room (a new micro-batch when none has)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    mbs: list[list[list[int]]] = []
    fills: list[list[int]] = []
    for i in order:
        n = lengths[i]
        placed = False
        for rows, fill in zip(mbs, fills, strict=True):
            for r in range(rows_per_mb):
                if r == len(rows):
                    rows.append([])
                    fill.append(0)
                if (not rows[r] or not one_per_row) and fill[r] + n <= row_len:
                    rows[r].append(i)
                    fill[r] += n
                    placed = True
                    break
            if placed:
                break
        if not placed:
            mbs.append([[i]])
            fills.append([n])
    return mbs


def pack_sequences(
    input_ids: Sequence[ArrayLike],
    fields: Mapping[str, Sequence[ArrayLike]] | None = None,
    *,
    max_tokens_per_mb: int,
    row_len: int | None = None,
    rows_multiple: int = 1,
    min_microbatches: int = 1,
    min_slots: int = 1,
    min_rows: int = 1,
    min_grid_len: int = 1,
    pack: bool = True,
    bucket_lengths: Callable[[int], int] | None = bucket_size,
    bucket_counts: Callable[[int], int] | None = power_of_two,
) -> PackedBatch:
    """Pack variable-length sequences into micro-batches of at most ``max_tokens_per_mb`` tokens.

    ``input_ids``: one 1-D token array per sequence. ``fields``: per-token values, one array per
    sequence of the same length (e.g. ``loss_mask``, ``advantages``, ``old_logp``).
    ``row_len``: tokens per row (default: the bucketed longest sequence); a micro-batch has
    R = max_tokens_per_mb // row_len rows (at least one), rounded down to a multiple of
    ``rows_multiple`` (set it to the number of batch shards, data × fsdp, so rows shard evenly);
    when the whole batch fits in fewer rows, R is the rows used, bucketed by ``bucket_counts``
    and rounded up to a multiple of ``rows_multiple``.
    ``min_microbatches`` / ``min_slots`` / ``min_rows`` / ``min_grid_len`` are floors on M, S, R
    (up to the budget's rows) and T (up to L): fix them to keep shapes, and so compiled steps,
    steady across batches (`ShapeFloors` keeps them). ``pack=False`` puts one sequence per row (the
    padded layout). ``bucket_lengths`` rounds the default row length up, ``bucket_counts`` the
    micro-batch count M and slots S (None: exact sizes). Raises ValueError naming the bad
    sequence or field.
    """
    fields = dict(fields or {})
    if len(input_ids) == 0:
        raise ValueError("pack_sequences: got no sequences.")
    sizes = dict(
        max_tokens_per_mb=max_tokens_per_mb,
        rows_multiple=rows_multiple,
        min_microbatches=min_microbatches,
        min_slots=min_slots,
        min_rows=min_rows,
        min_grid_len=min_grid_len,
    )
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"pack_sequences: {name} must be >= 1, got {size}.")
    round_len = bucket_lengths or (lambda n: n)
    round_count = bucket_counts or (lambda n: n)
    seqs = [_as_1d(x, f"input_ids[{i}]") for i, x in enumerate(input_ids)]
    lengths = [len(s) for s in seqs]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"pack_sequences: sequence {i} is empty.")
    values: dict[str, list[np.ndarray]] = {}
    for name, per_seq in fields.items():
        if name in ROW_KEYS + INDEX_KEYS:
            raise ValueError(f"pack_sequences: field name {name!r} is reserved.")
        if len(per_seq) != len(seqs):
            raise ValueError(
                f"pack_sequences: fields[{name!r}] has {len(per_seq)} sequences, "
                f"input_ids has {len(seqs)}."
            )
        values[name] = [_as_1d(v, f"fields[{name!r}][{i}]") for i, v in enumerate(per_seq)]
        for i, v in enumerate(values[name]):
            if len(v) != lengths[i]:
                raise ValueError(
                    f"pack_sequences: fields[{name!r}][{i}] has {len(v)} entries but sequence "
                    f"{i} has {lengths[i]} tokens."
                )
    if MASK_FIELD in values:
        for i, m in enumerate(values[MASK_FIELD]):
            if m[0] != 0:
                raise ValueError(
                    f"pack_sequences: loss_mask of sequence {i} marks its first token, which "
                    "has no log-prob (nothing precedes it); set it to 0."
                )
    longest = max(lengths)
    seq_len = round_len(longest)
    L = seq_len if row_len is None else int(row_len)
    if longest > L:
        i = lengths.index(longest)
        raise ValueError(f"pack_sequences: sequence {i} has {longest} tokens > row_len {L}.")
    R = max(rows_multiple, (max_tokens_per_mb // L) // rows_multiple * rows_multiple)
    mbs = _first_fit_decreasing(lengths, L, R, one_per_row=not pack)
    # A batch smaller than one budget gets only the (bucketed) rows it uses, not the budget's:
    # padding rows would cost compute like real ones.
    used = round_count(max(len(rows) for rows in mbs))
    R = min(R, -(-max(used, min_rows) // rows_multiple) * rows_multiple)
    M = round_count(max(len(mbs), min_microbatches))
    S = round_count(max(min_slots, *(sum(len(row) for row in rows) for rows in mbs)))
    T = min(L, max(seq_len, min_grid_len))

    rows = {k: np.zeros((M, R, L), np.int32) for k in ROW_KEYS}
    token_index = np.zeros((M, S, T), np.int32)
    seq_lens = np.zeros((M, S), np.int32)
    seq_index = np.full((M, S), -1, np.int64)
    grid = {k: np.zeros((M, S, T), np.float32) for k in values}
    for m, mb_rows in enumerate(mbs):
        slot = 0
        for r, row in enumerate(mb_rows):
            start = 0
            for segment, i in enumerate(row, start=1):
                n = lengths[i]
                span = slice(start, start + n)
                rows["input_ids"][m, r, span] = seqs[i]
                rows["positions"][m, r, span] = np.arange(n)
                rows["segment_ids"][m, r, span] = segment
                token_index[m, slot, :n] = r * L + start + np.arange(n)
                seq_lens[m, slot] = n
                seq_index[m, slot] = i
                for k, v in values.items():
                    grid[k][m, slot, :n] = v[i]
                start += n
                slot += 1
    arrays = {**rows, "token_index": token_index, "seq_lens": seq_lens, **grid}
    return PackedBatch(arrays=arrays, seq_index=seq_index)


class ShapeFloors:
    """High-water marks of packed shapes, so that a run compiles each step a few times, not once
    per new batch shape.

    With heavy-tailed lengths, bucketing alone still meets new (M, R, S, T) combinations for
    many steps, each a recompile of the train / inference steps (seconds each on CPU). Packing
    with `floors` pads every batch to the largest M, R, S and T seen so far under the same key
    (the caller's: e.g. the number of sequences and the token budget); `update` raises them.
    Each dimension only grows, through its few buckets, so the compiled shapes settle early. The
    padding is cheap: empty micro-batches are skipped on the device and empty slots only widen
    the per-token grid; padded rows do cost model compute, but only up to the rows earlier
    batches of the run needed.
    """

    def __init__(self) -> None:
        self._floors: dict[Hashable, dict[str, int]] = {}

    def floors(self, key: Hashable) -> dict[str, int]:
        """The ``min_*`` keyword arguments of `pack_sequences` for batches under ``key``."""
        return dict(self._floors.get(key, {}))

    def update(self, key: Hashable, packed: PackedBatch) -> None:
        M, R, _ = packed.arrays["input_ids"].shape
        _, S, T = packed.arrays["token_index"].shape
        seen = {"min_microbatches": M, "min_rows": R, "min_slots": S, "min_grid_len": T}
        old = self._floors.setdefault(key, seen)
        for k, v in seen.items():
            old[k] = max(old[k], v)


def unpack(packed: PackedBatch, grid_mst: ArrayLike) -> list[np.ndarray]:
    """Per-token grid values ``[M, S, T]`` back to one array per input sequence (input order)."""
    grid = np.asarray(grid_mst)
    out: list[np.ndarray | None] = [None] * packed.num_sequences
    lens = packed.arrays["seq_lens"]
    for m, s in zip(*np.nonzero(packed.seq_index >= 0), strict=True):
        out[packed.seq_index[m, s]] = grid[m, s, : lens[m, s]].copy()
    return out  # type: ignore[return-value]


def unpack_scalars(packed: PackedBatch, values_ms: ArrayLike) -> np.ndarray:
    """Per-sequence values ``[M, S]`` back to a ``[N]`` array in input order."""
    values = np.asarray(values_ms)
    out = np.zeros((packed.num_sequences,), values.dtype)
    filled = packed.seq_index >= 0
    out[packed.seq_index[filled]] = values[filled]
    return out


def sequences_from_padded(
    input_ids_bt: ArrayLike, attention_mask_bt: ArrayLike, **fields_bt: ArrayLike
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """Split a padded ``[B, T]`` batch (any padding side) into per-sequence arrays for packing.

    Keeps the tokens where ``attention_mask_bt`` is 1; each field is cut the same way.
    """
    ids = np.asarray(input_ids_bt)
    mask = np.asarray(attention_mask_bt) > 0
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(
            f"sequences_from_padded: input_ids {ids.shape} and attention_mask {mask.shape} must "
            "be one [batch, seq] shape."
        )
    out_fields: dict[str, list[np.ndarray]] = {}
    for name, value in fields_bt.items():
        arr = np.asarray(value)
        if arr.shape != ids.shape:
            raise ValueError(
                f"sequences_from_padded: {name} has shape {arr.shape}, expected {ids.shape}."
            )
        out_fields[name] = [arr[b][mask[b]] for b in range(ids.shape[0])]
    return [ids[b][mask[b]] for b in range(ids.shape[0])], out_fields
