"""Prompt pipelines: readers, field mapping, chat templates, bad rows, shuffling, epochs,
process sharding and exact resumption of the iterator."""

import dataclasses
import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from jaxrlhf.config import DataConfig
from jaxrlhf.data.pipeline import build_prompt_pipeline, load_tokenizer
from jaxrlhf.data.readers import DataError
from jaxrlhf.data.tasks import ArithmeticTask

SAMPLE = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
GSM8K = dict(prompt_key="question", answer_key="answer", max_prompt_len=256)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def drain(it, n: int) -> list[str]:
    return [p for _ in range(n) for p in next(it).prompts]


def test_gsm8k_jsonl_field_mapping_and_left_padded_batches(tok):
    rows = sample_rows()
    pipe = build_prompt_pipeline(
        DataConfig(train_path=str(SAMPLE), batch_size=4, shuffle=False, **GSM8K), tok
    )
    assert len(pipe.table) == len(rows) == 32 and pipe.stats.bad_rows == 0
    b = next(pipe.iterator())
    assert b.prompts == tuple(r["question"] for r in rows[:4])
    assert b.answers == tuple(r["answer"] for r in rows[:4])
    assert b.answers[0].endswith("#### 36")
    assert b.input_ids_bt.shape == b.attention_mask_bt.shape == (4, 256)
    assert b.input_ids_bt.dtype == np.int32
    for i, text in enumerate(b.prompts):
        n = int(b.attention_mask_bt[i].sum())
        assert b.attention_mask_bt[i, -n:].all() and not b.attention_mask_bt[i, :-n].any()
        assert tok.decode(b.input_ids_bt[i, -n:]) == tok.decode(tok(text)["input_ids"])
        assert (b.input_ids_bt[i, :-n] == tok.pad_token_id).all()
    assert b.row_ids_b.tolist() == b.sample_ids_b.tolist() == [0, 1, 2, 3] and b.step == 0


def test_row_metadata_from_jsonl_parquet_and_hf(tok, tmp_path):
    """Every field but the prompt and answer keys reaches the batch as the row's metadata (for
    reward functions), from each reader; the built-in task has none."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": f"{i}+1=", "a": str(i + 1), "id": i, "extra": {"tests": [i, -i]}}
            for i in range(4)]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    want = tuple({"id": r["id"], "extra": r["extra"]} for r in rows)
    for path in ("rows.jsonl", "rows.parquet", "hf"):
        cfg = DataConfig(train_path=str(tmp_path / path), prompt_key="q", answer_key="a",
                         batch_size=4, shuffle=False)  # fmt: skip
        batch = next(build_prompt_pipeline(cfg, tok).iterator())
        assert batch.metadata == want, path
        assert batch.row_metadata(2) == want[2]
    toy = next(build_prompt_pipeline(DataConfig(batch_size=2), tok).iterator())
    assert toy.metadata == ({}, {})


def test_bad_rows_are_counted_skipped_and_named(tok, tmp_path, caplog):
    good = sample_rows()[:6]
    lines = [json.dumps(good[0]), '{"question": "Half a line', json.dumps(good[1]), ""]
    lines += [json.dumps({"question": "No answer here"}), json.dumps(good[2]), "[1, 2]"]
    lines += [json.dumps({"question": "x" * 300, "answer": "1"}), json.dumps(good[3])]
    lines += [json.dumps({"question": "", "answer": "2"}), json.dumps(good[4])]
    path = tmp_path / "corrupt.jsonl.gz"
    data = ("\n".join(lines) + "\n").encode() + b'{"question": "caf\xe9", "answer": 1}\n'
    path.write_bytes(gzip.compress(data))
    cfg = DataConfig(train_path=str(path), batch_size=1, **GSM8K)
    with caplog.at_level(logging.WARNING, logger="jaxrlhf.data"):
        pipe = build_prompt_pipeline(cfg, tok)
    stats = pipe.stats
    assert (stats.rows_read, stats.kept, stats.bad_rows) == (11, 5, 6)
    assert dict(stats.skipped) == {"bad_json": 3, "missing_key": 1, "too_long": 1, "bad_value": 1}
    assert stats.as_metrics()["data/bad_rows"] == 6.0
    text = caplog.text
    assert f"{path}:2: unparseable JSON" in text
    assert f"{path}:5: missing key 'answer'" in text
    assert f"{path}:7: expected a JSON object" in text
    assert f"{path}:8: prompt has 300 tokens > 256" in text
    assert f"{path}:10: prompt 'question' is empty" in text
    assert f"{path}:12: not UTF-8 (byte 18)" in text
    assert "skipped 6 of 11 rows" in text
    assert set(pipe.table.prompts) == {r["question"] for r in good[:5]}
    with pytest.raises(
        DataError, match=rf"{path}:2: unparseable JSON: Unterminated string .*data.strict"
    ):
        build_prompt_pipeline(cfg, tok, strict=True)


def test_parquet_and_hf_datasets_read_like_jsonl(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sample_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows[:20]), test=datasets.Dataset.from_list(rows[20:])
    ).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=1))
    ref = build_prompt_pipeline(DataConfig(train_path=str(SAMPLE), **GSM8K), tok, seed=3)
    shards = tmp_path / "shards"  # a directory of files, read in name order
    shards.mkdir()
    (shards / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    pq.write_table(pa.Table.from_pylist(rows[16:]), shards / "part-1.parquet")
    for path in (tmp_path / "train.parquet", tmp_path / "array.json", shards):
        pipe = build_prompt_pipeline(DataConfig(train_path=str(path), **GSM8K), tok, seed=3)
        assert pipe.fingerprint == ref.fingerprint
    hf = DataConfig(train_path=str(tmp_path / "hf"), eval_path=str(tmp_path / "hf"), **GSM8K)
    assert build_prompt_pipeline(hf, tok).table.prompts == ref.table.prompts[:20]
    evals = build_prompt_pipeline(hf, tok, split="eval")
    assert evals.table.prompts == tuple(r["question"] for r in rows[20:])
    with pytest.raises(DataError, match="no column 'query'"):
        build_prompt_pipeline(DataConfig(train_path=str(tmp_path / "hf"), prompt_key="query"), tok)
    with pytest.raises(DataError, match="could not load HF dataset 'hf:no-owner/no-data'"):
        build_prompt_pipeline(DataConfig(train_path="hf:no-owner/no-data"), tok)  # offline
    with pytest.raises(DataError, match="not a file, a directory, a built-in task"):
        build_prompt_pipeline(DataConfig(train_path=str(tmp_path / "nope.jsonl")), tok)


def test_chat_templates_messages_and_dotted_keys(tmp_path):
    tok = load_tokenizer(None)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    rows = [
        {"q": "1+1=", "meta": {"gt": 2}},
        {"q": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}],
         "meta": {"gt": "4"}},
    ]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train_path=str(path), prompt_key="q", answer_key="meta.gt", batch_size=2)
    plain = build_prompt_pipeline(cfg, tok).table
    assert plain.prompts == ("1+1=", "[system]be brief[user]2+2=[assistant]")
    assert plain.answers == ("2", "4")
    chat = build_prompt_pipeline(dataclasses.replace(cfg, apply_chat_template=True), tok)
    assert chat.table.prompts[0] == "[user]1+1=[assistant]"


def test_iterator_resumes_exactly_across_epoch_boundaries(tok):
    cfg = DataConfig(batch_size=4, max_prompt_len=8)  # toy task: 10 prompts, 2.5 batches/epoch

    def build():
        return build_prompt_pipeline(cfg, tok, seed=5, task_size=10)

    straight = drain(build().iterator(), 8)
    it = build().iterator()
    first = drain(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert state["grain"] == {"next_index": 3}
    resumed = first + drain(build().iterator(state), 5)
    assert resumed == straight
    epochs = [straight[i : i + 10] for i in range(0, 30, 10)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # each epoch is a permutation
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert drain(build_prompt_pipeline(cfg, tok, seed=6, task_size=10).iterator(), 8) != straight
    other = build_prompt_pipeline(cfg, tok, seed=6, task_size=10)
    with pytest.raises(DataError, match="another dataset or other data settings"):
        other.iterator(state)


def test_process_shards_tile_the_global_batch(tok):
    cfg = DataConfig(train_path=str(SAMPLE), batch_size=6, **GSM8K)
    whole = build_prompt_pipeline(cfg, tok, seed=1, process_index=0, process_count=1).iterator()
    shards = [
        build_prompt_pipeline(cfg, tok, seed=1, process_index=i, process_count=3).iterator()
        for i in range(3)
    ]
    for _ in range(7):  # crosses the epoch boundary at 32 rows
        full = next(whole)
        parts = [next(s) for s in shards]
        assert all(len(p) == 2 for p in parts)
        assert sum((p.prompts for p in parts), ()) == full.prompts
        assert (
            np.concatenate([p.sample_ids_b for p in parts]).tolist() == full.sample_ids_b.tolist()
        )
    with pytest.raises(DataError, match="not divisible by the 4 processes"):
        build_prompt_pipeline(cfg, tok, process_index=0, process_count=4)


def test_finite_epochs_eval_split_and_toy_source(tok):
    cfg = DataConfig(train_path=str(SAMPLE), eval_path=str(SAMPLE), batch_size=5, **GSM8K)
    train = build_prompt_pipeline(cfg, tok, num_epochs=2)
    assert train.num_batches == 12
    assert train.fingerprint == build_prompt_pipeline(cfg, tok).fingerprint  # more epochs: same
    assert len(list(train.iterator())) == 12
    evals = build_prompt_pipeline(cfg, tok, split="eval")
    batches = list(evals.iterator())
    assert [len(b) for b in batches] == [5] * 6 + [2]
    assert sum((b.prompts for b in batches), ()) == tuple(r["question"] for r in sample_rows())
    toy = build_prompt_pipeline(DataConfig(batch_size=2), tok, task_size=16)
    named = build_prompt_pipeline(
        DataConfig(train_path="arithmetic", batch_size=2), tok, task_size=16
    )
    assert toy.fingerprint == named.fingerprint
    problems = ArithmeticTask().problems(16, seed=0)
    pairs = set(zip(toy.table.prompts, toy.table.answers, strict=True))
    assert pairs == {(p.prompt, p.answer) for p in problems}
    toy_eval = build_prompt_pipeline(DataConfig(batch_size=2), tok, split="eval", task_size=16)
    assert toy_eval.table.prompts != toy.table.prompts
    named_eval = DataConfig(train_path="arithmetic", batch_size=2)
    assert (
        build_prompt_pipeline(named_eval, tok, split="eval", task_size=16).table.fingerprint
        == toy_eval.table.fingerprint
    )
    with pytest.raises(DataError, match="eval_path is not set"):
        build_prompt_pipeline(DataConfig(train_path=str(SAMPLE)), tok, split="eval")
