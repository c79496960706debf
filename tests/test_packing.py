"""Sequence packing: first-fit-decreasing placement, the row / grid layout, round trips,
bucketing and input errors (pure NumPy; no compilation)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrlhf.interfaces import (
    ShapeFloors,
    bucket_size,
    pack_sequences,
    sequences_from_padded,
    unpack,
    unpack_scalars,
)
from jaxrlhf.interfaces.packing import power_of_two


def _seqs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, n).astype(np.int32) for n in lengths]


def _rows_of(packed):
    """{mb: [[seq, ...] per row]} read back from segment ids and token_index."""
    arr, L = packed.arrays, packed.arrays["input_ids"].shape[-1]
    out = {}
    for m in range(packed.num_microbatches):
        rows = [[] for _ in range(arr["input_ids"].shape[1])]
        for s, i in enumerate(packed.seq_index[m]):
            if i >= 0:
                rows[arr["token_index"][m, s, 0] // L].append(int(i))
        out[m] = [r for r in rows if r]
    return out


def test_bucket_sizes():
    assert [bucket_size(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert bucket_size(100) == 128 and bucket_size(129) == 192 and bucket_size(4097) == 6144
    assert [power_of_two(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_first_fit_decreasing_known_example():
    # Longest first: 7 opens mb0/row0, 5 row1, 4 fits nowhere (mb1), 3 joins 5, 1 joins 7.
    packed = pack_sequences(
        _seqs([4, 7, 1, 5, 3]), max_tokens_per_mb=16, row_len=8, bucket_counts=None
    )
    assert _rows_of(packed) == {0: [[1, 2], [3, 4]], 1: [[0]]}
    arr = packed.arrays
    assert arr["input_ids"].shape == (2, 2, 8) and arr["token_index"].shape == (2, 4, 8)
    np.testing.assert_array_equal(arr["segment_ids"][0, 0], [1] * 7 + [2])
    np.testing.assert_array_equal(arr["positions"][0, 0], [0, 1, 2, 3, 4, 5, 6, 0])
    np.testing.assert_array_equal(arr["segment_ids"][1, 0], [1] * 4 + [0] * 4)
    np.testing.assert_array_equal(arr["seq_lens"], [[7, 1, 5, 3], [4, 0, 0, 0]])


@pytest.mark.parametrize("seed", range(4))
def test_layout_invariants_on_random_batches(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=int(rng.integers(1, 40)))
    ids = _seqs(lengths, seed)
    extra = {"adv": [rng.normal(size=n).astype(np.float32) for n in lengths]}
    packed = pack_sequences(ids, extra, max_tokens_per_mb=200)
    arr = packed.arrays
    M, R, L = arr["input_ids"].shape
    assert bucket_size(int(lengths.max())) == L and R * L <= 200 and R == 200 // L
    assert packed.num_sequences == len(ids) and packed.real_tokens() == lengths.sum()
    flat = arr["input_ids"].reshape(M, -1)
    seen = []
    for m, s in zip(*np.nonzero(packed.seq_index >= 0), strict=True):
        i, n = packed.seq_index[m, s], arr["seq_lens"][m, s]
        idx = arr["token_index"][m, s, :n]
        np.testing.assert_array_equal(flat[m, idx], ids[i])  # the tokens, in order
        np.testing.assert_array_equal(arr["positions"].reshape(M, -1)[m, idx], np.arange(n))
        seg = arr["segment_ids"].reshape(M, -1)[m, idx]
        assert len(set(seg.tolist())) == 1 and seg[0] > 0
        assert idx[0] // L == idx[-1] // L  # a sequence never crosses rows
        seen.append(i)
    assert sorted(seen) == list(range(len(ids)))
    assert (arr["segment_ids"] > 0).sum() == lengths.sum()  # the rest is padding
    for got, want in zip(unpack(packed, arr["adv"]), extra["adv"], strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(unpack_scalars(packed, arr["seq_lens"]), lengths)
    # First fit: a sequence in micro-batch k fitted in no row of an earlier micro-batch.
    fill = {
        m: [int(lengths[r].sum()) for r in map(np.asarray, rows)]
        for m, rows in _rows_of(packed).items()
    }
    for k, rows in _rows_of(packed).items():
        for i in (i for row in rows for i in row):
            for j in range(k):
                assert len(fill[j]) == R and all(f + lengths[i] > L for f in fill[j])


def test_padded_mode_buckets_and_floors():
    lengths = [5, 3, 2, 2, 6]
    padded = pack_sequences(_seqs(lengths), max_tokens_per_mb=24, row_len=6, pack=False)
    assert all(len(r) == 1 for rows in _rows_of(padded).values() for r in rows)
    assert padded.arrays["input_ids"].shape == (2, 4, 6)  # 5 rows in 4-row mbs
    floors = pack_sequences(
        _seqs(lengths), max_tokens_per_mb=24, rows_multiple=3, min_microbatches=3, min_slots=5
    )
    M, R, L = floors.arrays["input_ids"].shape
    assert (M, R, L) == (4, 3, 6) and floors.arrays["seq_lens"].shape == (4, 8)
    assert floors.arrays["seq_lens"][2:].sum() == 0  # fillers
    exact = pack_sequences(
        _seqs(lengths), max_tokens_per_mb=7, bucket_lengths=None, bucket_counts=None
    )
    assert exact.arrays["input_ids"].shape == (4, 1, 6)


def test_shape_floors_only_grow_and_keep_contents():
    """Batches packed under `ShapeFloors` take the high-water shape of their size, so a run meets
    few shapes; the padded batch holds exactly the same sequences (an unfloored pack compared)."""
    rng = np.random.default_rng(0)
    floors = ShapeFloors()
    shapes, plain_shapes, high = [], [], None
    for step in range(30):
        n = 12 if step % 3 else 5  # two batch sizes keep separate floors
        lengths = np.minimum(rng.pareto(1.2, n).astype(int) + 2, 40)  # heavy tail
        ids = _seqs(lengths, step)
        adv = [rng.normal(size=k).astype(np.float32) for k in lengths]
        plain = pack_sequences(ids, {"adv": adv}, max_tokens_per_mb=64, row_len=48)
        packed = pack_sequences(
            ids, {"adv": adv}, max_tokens_per_mb=64, row_len=48, **floors.floors(n)
        )
        floors.update(n, packed)
        got = (*packed.arrays["input_ids"].shape, *packed.arrays["token_index"].shape[1:])
        want = (*plain.arrays["input_ids"].shape, *plain.arrays["token_index"].shape[1:])
        assert all(g >= w for g, w in zip(got, want, strict=True))
        if n == 12:
            if high is not None:  # M, R, L, S, T never shrink for one batch size
                assert all(g >= h for g, h in zip(got, high, strict=True))
            high = got
            shapes.append(got)
            plain_shapes.append(want)
        for a, b in zip(unpack(packed, packed.arrays["adv"]), adv, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(unpack_scalars(packed, packed.arrays["seq_lens"]), lengths)
    # The plain packs of size 12 met more distinct shapes than the floored ones.
    assert len(set(shapes)) <= 4 < len(set(plain_shapes))
    assert floors.floors(5) != floors.floors(12)


def test_sequences_from_padded_left_and_right():
    ids = np.array([[0, 0, 5, 6, 7], [8, 9, 0, 0, 0]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    adv = np.arange(10.0).reshape(2, 5)
    seqs, fields = sequences_from_padded(ids, mask, adv=adv)
    assert [s.tolist() for s in seqs] == [[5, 6, 7], [8, 9]]
    assert [a.tolist() for a in fields["adv"]] == [[2.0, 3.0, 4.0], [5.0, 6.0]]
    with pytest.raises(ValueError, match="adv has shape"):
        sequences_from_padded(ids, mask, adv=adv[:, :3])


@pytest.mark.parametrize(
    ("ids", "fields", "kwargs", "match"),
    [
        ([], {}, {}, "no sequences"),
        ([[1, 2], []], {}, {}, "sequence 1 is empty"),
        ([[1, 2], [3]], {"adv": [[0.0, 1.0], [0.0, 1.0]]}, {}, r"fields\['adv'\]\[1\] has 2"),
        ([[1, 2], [3]], {"adv": [[0.0, 1.0]]}, {}, "has 1 sequences, input_ids has 2"),
        ([[1, 2]], {"loss_mask": [[1.0, 1.0]]}, {}, "marks its first token"),
        ([[1, 2, 3]], {}, {"row_len": 2}, "3 tokens > row_len 2"),
        ([[1, 2]], {"seq_lens": [[0, 0]]}, {}, "reserved"),
        ([[[1, 2]]], {}, {}, "must be 1-D"),
        ([[1, 2]], {}, {"max_tokens_per_mb": 0}, "max_tokens_per_mb must be >= 1"),
    ],
)
def test_bad_input(ids, fields, kwargs, match):
    kwargs = {"max_tokens_per_mb": 16} | kwargs
    with pytest.raises(ValueError, match=match):
        pack_sequences(ids, fields, **kwargs)
