"""The locally built tokenizer and the built-in arithmetic task."""

import numpy as np
from transformers import AutoTokenizer

from jaxrlhf.data.tasks import ArithmeticTask
from jaxrlhf.data.tokenizer import DEFAULT_CHARS, build_char_tokenizer


def test_char_tokenizer_round_trip_through_auto_tokenizer(tmp_path):
    tok = build_char_tokenizer()
    text = "12+7=19"
    ids = tok(text)["input_ids"]
    assert ids == [4 + DEFAULT_CHARS.index(c) for c in text]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.decode([*ids, again.eos_token_id], skip_special_tokens=True) == text
    assert (again.pad_token_id, again.eos_token_id, again.padding_side) == (0, 1, "left")
    batch = again(["1+1=", "10+10="], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0][:2] == [0, 0]
    chat = again.apply_chat_template([{"role": "user", "content": "2+2="}], tokenize=False)
    assert chat == "2+2="


def test_arithmetic_task_is_reproducible_and_scored_exactly():
    task = ArithmeticTask(max_operand=9, ops=("+", "-", "*"))
    a, b = task.problems(50, seed=3), task.problems(50, seed=3)
    assert a == b and a != task.problems(50, seed=4)
    for p in a:
        x, op, y = p.prompt[0], p.prompt[1], p.prompt[2]
        assert p.prompt.endswith("=")
        assert (
            int(p.answer) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        )
        assert task.score(f" {p.answer} ", p.answer) == 1.0
        assert task.score(p.answer + "0", p.answer) == 0.0
    assert len({p.prompt for p in task.problems(400, seed=0)}) > 100
    assert np.isclose(np.mean([task.score("", p.answer) for p in a]), 0.0)


def test_arithmetic_eval_split_is_disjoint_and_covers_the_space():
    task = ArithmeticTask(max_operand=9, ops=("+", "-"), eval_every=5)
    assert {p.prompt for p in ArithmeticTask().all_problems("eval")} == {
        f"{a}{op}{b}=" for op in "+-" for a in range(10) for b in range(10)
    }
    train = {p.prompt for p in task.all_problems("train")}
    held_out = {p.prompt for p in task.all_problems("eval")}
    assert not train & held_out
    assert len(train) + len(held_out) == 200 and len(held_out) == 40
    assert {p.prompt for p in task.problems(2000, seed=1)} <= train
