"""Rewards: math answers, timeouts, format rewards, registry, dotted paths, parallel scoring."""

from __future__ import annotations

import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from jaxrlhf.registry import RegistryError
from jaxrlhf.rewards import (
    REWARDS,
    RewardLoadError,
    RewardPool,
    extract_answer,
    get_reward_fn,
    math_reward,
    score_batch,
    symbolic,
)
from jaxrlhf.rewards.symbolic import _sympy_equal

GSM8K_SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"

# (response, reference answer, expected reward)
MATH_CASES = [
    # --- extraction: boxed, fbox, GSM8K marker, "answer is", last number
    (r"So the total is \boxed{72}.", "72", 1.0),
    (r"First \boxed{3}, then correcting: \boxed{5}", "5", 1.0),
    (r"First \boxed{3}, then correcting: \boxed{5}", "3", 0.0),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}", 1.0),
    (r"The result is \fbox{17}", "17", 1.0),
    (r"hence $\boxed 7$", "7", 1.0),
    ("She has 72 clips.\n#### 72", "72", 1.0),
    ("She has 72 clips.\n#### 72", GSM8K_SOLUTION, 1.0),
    ("48/2 = 24 and 48 + 24 = 72.", GSM8K_SOLUTION, 1.0),
    ("Natalia sold 72 clips in total. The answer is 72.", GSM8K_SOLUTION, 1.0),
    ("The answer is 71.", GSM8K_SOLUTION, 0.0),
    ("The final answer is: **42**", "42", 1.0),
    ("After 3 days she has 12 apples left", "12", 1.0),
    ("The answer isn't 5, it's 6", "6", 1.0),
    ("<think>maybe 41? no: 6*7</think> The answer is 42.", "42", 1.0),
    ("<think>6*7 = \\boxed{42}</think> so 41", "42", 0.0),
    ("<think>ok</think><answer>42</answer>", "42", 1.0),
    # --- fractions, decimals, percentages
    (r"\boxed{\frac{3}{4}}", "0.75", 1.0),
    (r"\boxed{3/4}", r"\frac{3}{4}", 1.0),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34", 1.0),
    (r"\boxed{\tfrac{6}{8}}", "3/4", 1.0),
    (r"\boxed{0.75}", r"\dfrac{3}{4}", 1.0),
    (r"\boxed{2\frac{1}{2}}", "2.5", 1.0),
    (r"\boxed{\frac{-3}{4}}", "-0.75", 1.0),
    (r"\boxed{0.3333333}", r"\frac{1}{3}", 1.0),
    (r"\boxed{0.33}", r"\frac{1}{3}", 0.0),
    (r"\boxed{0.333}", "1/3", 0.0),
    (r"\boxed{3.50}", "3.5", 1.0),
    (r"\boxed{.5}", "0.5", 1.0),
    (r"\boxed{1.5}", "15", 0.0),
    (r"\boxed{12}", "121", 0.0),
    (r"\boxed{25\%}", "25", 1.0),
    ("The answer is 50%.", "0.5", 1.0),
    ("The answer is 5%.", "0.5", 0.0),
    (r"\boxed{1/0}", "0", 0.0),
    # --- thousands separators, currency, units
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{1{,}234{,}567}", "1234567", 1.0),
    ("#### 1,234,567.50", "1234567.5", 1.0),
    (r"\boxed{1,5}", "1.5", 0.0),
    (r"\boxed{\$18}", "18", 1.0),
    ("The answer is $18.00.", "#### 18", 1.0),
    ("He pays 18 dollars in total, so the answer is 18 dollars", "18", 1.0),
    (r"\boxed{18\text{ dollars}}", "18", 1.0),
    (r"\boxed{5\text{ cm}^2}", "5", 1.0),
    (r"\boxed{12 \mbox{ apples}}", "12", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{45^{\circ}}", r"45^\circ", 1.0),
    ("The answer is 30 km.", "30", 1.0),
    # --- negative numbers
    (r"\boxed{-5}", "-5", 1.0),
    (r"\boxed{-5}", "5", 0.0),
    (r"\boxed{\u22125}".replace(r"\u2212", "\u2212"), "-5", 1.0),
    ("The temperature fell to -12 degrees.", "-12", 1.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    (r"\boxed{-\dfrac{3}{4}}", r"\frac{3}{4}", 0.0),
    # --- LaTeX forms and symbolic equivalence
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", 1.0),
    (r"\boxed{\frac{\sqrt2}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
    (r"\boxed{2x+1}", "1+2x", 1.0),
    (r"\boxed{2x+2}", "1+2x", 0.0),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{18}", 1.0),
    (r"\boxed{\pi}", r"\pi", 1.0),
    (r"\boxed{3.14}", r"\pi", 0.0),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)", 1.0),
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{\text{Monday}}", "monday", 1.0),
    (r"\boxed{evil}", "live", 0.0),
    (r"\boxed{\text{(B)}}", r"\text{(C)}", 0.0),
    (r"$\boxed{x^2 - 1}$", "(x-1)(x+1)", 1.0),
    (r"\boxed{\frac{1}{2}}", r"The answer: $\boxed{\dfrac12}$", 1.0),
    # --- exact numbers: a tolerance only for decimals approximating 1/3, sqrt(2), ...
    (r"\boxed{1000001}", "1000000", 0.0),
    (r"\boxed{123456789}", "123456700", 0.0),
    ("The answer is 12,000,032.", "12000023", 0.0),
    (r"\boxed{2.0000001}", "2", 0.0),
    (r"\boxed{1000000.6}", "1000000.5", 0.0),
    (r"\boxed{10^6+1}", "1000000", 0.0),
    (r"\boxed{1.4142136}", r"\sqrt{2}", 1.0),
    # --- the "answer is" / "Answer:" span
    (r"The final answer is \((-6, 10)\)", "(-6, 10)", 1.0),
    (r"The final answer is \((-6, 10)\)", "-6", 0.0),
    ("Answer: Janet makes $18 every day.", "18", 1.0),
    ("Answer: Janet makes $19 every day.", "18", 0.0),
    (r"Final Answer: The final answer is $\frac{2}{3}$. I hope it is correct.", "2/3", 1.0),
    (r"Final Answer: The final answer is $(1, 2)$. I hope it is correct.", "(1,2)", 1.0),
    # --- number formats
    (r"\boxed{1\,234}", "1234", 1.0),
    ("raw text 1\\,234", "1234", 1.0),
    (r"\boxed{12 345}", "12345", 1.0),
    (r"\boxed{1{,}234}", "1235", 0.0),
    ("So the probability is 2/3.", "2/3", 1.0),
    ("So the probability is 2/3.", "3", 0.0),
    ("The rate grew by 40%.", "0.4", 1.0),
    (r"\boxed{2}", "2 = y", 1.0),
    (r"\boxed{3}", "2 = y", 0.0),
    (r"\boxed{2x+1+x^2}", "y = x^2+2x+1", 1.0),
    # --- malformed or missing output
    ("", "42", 0.0),
    ("   ", "42", 0.0),
    (r"The answer is \boxed{42", "42", 0.0),
    (r"\boxed{}", "0", 0.0),
    ("I do not know.", "42", 0.0),
    (r"\boxed{\frac{1}{2}", "1/2", 0.0),
    (r"\boxed{42}", "", 0.0),
    (r"\boxed{12 1}", "12", 0.0),
]


@pytest.mark.parametrize(("response", "answer", "expected"), MATH_CASES)
def test_math_reward_table(response: str, answer: str, expected: float) -> None:
    assert math_reward(response, answer) == expected


def test_math_table_is_large_enough() -> None:
    assert len(MATH_CASES) >= 60


def test_pathological_expression_times_out_and_helper_recovers() -> None:
    assert math_reward(r"\boxed{\sqrt{4}}", "2") == 1.0  # helper started outside the timing
    start = time.monotonic()
    assert math_reward(r"\boxed{9^{9^{9^{9}}}}", "1", timeout=1.0) == 0.0
    assert time.monotonic() - start < 3.0
    # The helper was killed; the next symbolic check starts a new one and works.
    assert math_reward(r"\boxed{\frac{\sqrt2}{2}}", r"\sqrt{2}/2") == 1.0


def test_pathological_reference_times_out() -> None:
    start = time.monotonic()
    assert math_reward(r"\boxed{1}", r"9^{9^{9^{9}}}", timeout=1.0) == 0.0
    assert time.monotonic() - start < 5.0  # may include a helper start


def test_degenerate_responses_are_cheap() -> None:
    start = time.monotonic()
    assert math_reward("\\boxed{" * 20_000 + "1", "1") == 0.0
    assert math_reward("The answer is " + "1 a " * 20_000, "1") == 0.0
    assert get_reward_fn("format_boxed")("\\boxed{" * 20_000, "") == 0.0
    assert get_reward_fn("format_think")(" " * 50_000 + "x", "") == 0.0
    assert time.monotonic() - start < 2.0


def test_unclosed_math_spans_are_cheap() -> None:
    """The math-span rule is linear in a response of thousands of unclosed delimiters."""
    start = time.monotonic()
    for opener in ("\\[", "\\(", "$$", "$ 1 "):
        assert math_reward(opener * 20_000, "7") == 0.0
    assert time.monotonic() - start < 2.0


def test_numeric_reference_column() -> None:
    assert math_reward(r"\boxed{42}", 42) == 1.0  # type: ignore[arg-type]
    assert math_reward(r"\boxed{0.75}", 0.75) == 1.0  # type: ignore[arg-type]
    assert math_reward(r"\boxed{1}", None) == 0.0  # type: ignore[arg-type]


def test_math_boxed_requires_a_box() -> None:
    fn = get_reward_fn("math_boxed")
    assert fn(r"so \boxed{42}", "42") == 1.0
    assert fn("The answer is 42.", "42") == 0.0


def test_extract_answer_rules() -> None:
    assert extract_answer(r"\boxed{\frac{a}{b^{2}}}") == r"\frac{a}{b^{2}}"
    assert extract_answer(r"\boxed{1} and \boxed{2") is None
    assert extract_answer("#### 5\nExtra text") == "5"
    assert extract_answer("nothing here") is None
    assert extract_answer(r"The final answer is \((-6, 10)\).") == "-6, 10".join("()")
    assert extract_answer("Answer: Janet makes $18 every day.") == "18"
    assert extract_answer("Final Answer: The final answer is $x^2$. I hope it is correct.") == "x^2"
    assert extract_answer("so it is 2/3.") == "2/3"
    assert extract_answer(r"we get 1\,234 apples") == r"1\,234"
    assert extract_answer("it grows by 40%") == "40%"
    assert extract_answer(r"so the pair is $(7, 6)$.") == "(7, 6)"
    assert extract_answer("He pays $18 for shirts and $20 for pants.") == "20"  # currency
    assert extract_answer("-1 + sqrt(3)") == "-1 + sqrt(3)"
    assert extract_answer("3+4=7") == "7"


def test_math_table_with_sympy_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without math_verify the sympy fallback gives the same table (checked in-process)."""
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify -> ImportError
    monkeypatch.setattr(symbolic, "_inline", True)
    assert [math_reward(r, a) for r, a, _ in MATH_CASES] == [e for _, _, e in MATH_CASES]


def test_math_reward_from_threads() -> None:
    """math_verify's signal timeout fails off the main thread; the helper process does not."""
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda c: math_reward(c[0], c[1]), MATH_CASES[-20:]))
    assert got == [c[2] for c in MATH_CASES[-20:]]


def test_sympy_fallback() -> None:
    assert _sympy_equal(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2")
    assert _sympy_equal("2x+1", "1+2x")
    assert not _sympy_equal("2x+1", "2x")
    assert not _sympy_equal("12", "12 1")
    assert not _sympy_equal("__import__('os')", "1")  # never reaches eval
    # Integers and finite decimals compare exactly; a tolerance only for approximations.
    assert not _sympy_equal("1000000", "10^6+1")
    assert not _sympy_equal("2", "2.0000001")
    assert _sympy_equal("10^6", "1000000.0")
    assert _sympy_equal(r"\frac{1}{3}", "0.3333333")
    assert _sympy_equal(r"\sqrt{2}", "1.4142136")
    assert not _sympy_equal(r"\pi", "3.14")
    assert _sympy_equal(r"\frac{\sqrt{6}+\sqrt{2}}{4}", r"\cos(\pi/12)")  # exact, numerically


def test_plain_to_latex() -> None:
    assert symbolic.plain_to_latex("-1 + sqrt(3)") == r"-1 + \sqrt{3}"
    assert symbolic.plain_to_latex("2**(1/4)") == "2^{(1/4)}"
    assert symbolic.plain_to_latex("sqrt(sqrt(2))*x**2") == r"\sqrt{\sqrt{2}}*x^2"
    assert symbolic.plain_to_latex(r"\sqrt{3}") == r"\sqrt{3}"
    assert symbolic.plain_to_latex("sqrt(3") == "sqrt(3"  # unbalanced: as is


@pytest.mark.parametrize(
    ("name", "response", "expected"),
    [
        ("format_boxed", r"so \boxed{4}", 1.0),
        ("format_boxed", r"\boxed{4} or \boxed{5}", 0.0),
        ("format_boxed", r"\boxed{4", 0.0),
        ("format_boxed", r"\boxed{ }", 0.0),
        ("format_boxed", r"<think>\boxed{3}?</think> \boxed{4}", 1.0),
        ("format_think", "<think>reason</think> 42", 1.0),
        ("format_think", "reason</think> 42", 1.0),  # <think> prefilled by the template
        ("format_think", "<think>reason</think>", 0.0),
        ("format_think", "<think></think> 42", 0.0),
        ("format_think", "<think>a</think> b </think> c", 0.0),
        ("format_think", "42", 0.0),
        ("format_think_answer", "<think>r</think>\n<answer>42</answer>", 1.0),
        ("format_think_answer", "<think>r</think><answer>42</answer> extra", 0.0),
        ("format_think_answer", "<think>r</think>42", 0.0),
    ],
)
def test_format_rewards(name: str, response: str, expected: float) -> None:
    assert get_reward_fn(name)(response, "") == expected


# ---- registry and custom functions ---------------------------------------------------------


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    """A tiny importable reward module on sys.path (also seen by worker processes)."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            import time

            def length(response, answer):
                return float(len(response))

            def with_context(response, answer, *, prompt=None, metadata=None):
                return float(len(prompt or "") + (metadata or {}).get("bonus", 0))

            def loose(response, answer, **kwargs):
                return float(sorted(kwargs) == ["metadata", "prompt"])

            def slow_if_asked(response, answer):
                if response == "hang":
                    time.sleep(60)
                if response == "crash":
                    import os
                    os._exit(3)
                if response == "raise":
                    raise RuntimeError("boom")
                if response == "none":
                    return None
                return 1.0 if response == answer else 0.0

            def no_args():
                return 1.0

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_registry_has_builtins() -> None:
    for name in ("math", "math_boxed", "format_boxed", "format_think", "format_think_answer"):
        assert name in REWARDS


def test_custom_dotted_path(custom_module: str) -> None:
    assert get_reward_fn(f"{custom_module}:length")("abc", "") == 3.0
    fn = get_reward_fn(f"{custom_module}:with_context")
    assert fn("r", "a", prompt="four", metadata={"bonus": 1}) == 5.0
    assert get_reward_fn(f"{custom_module}:loose")("r", "a") == 1.0


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_pkg.rewards:score", "cannot import module 'no_such_pkg.rewards'"),
        ("my_rewards:missing", "module 'my_rewards' has no attribute 'missing'"),
        ("my_rewards:NOT_CALLABLE", "is a int, not callable"),
        ("my_rewards:no_args", "cannot be called as fn(response, answer)"),
        ("my_rewards:", "is malformed; expected 'package.module:name'"),
        (":score", "is malformed"),
    ],
)
def test_bad_dotted_paths(custom_module: str, path: str, message: str) -> None:
    with pytest.raises(RewardLoadError, match="expected") as info:
        get_reward_fn(path)
    assert message in str(info.value)
    assert path in str(info.value) or path.partition(":")[0] in str(info.value)


def test_unknown_name_suggests() -> None:
    expected = r"or a custom 'package\.module:function'; did you mean 'math'\?"
    with pytest.raises(RegistryError, match=expected):
        get_reward_fn("maths")


# ---- parallel scoring ----------------------------------------------------------------------


def test_score_batch_in_process_matches_table() -> None:
    cases = MATH_CASES[:20]
    scores = score_batch("math", [c[0] for c in cases], [c[1] for c in cases], num_workers=0)
    assert scores == [c[2] for c in cases]


def test_score_batch_workers_preserve_order_and_results() -> None:
    cases = MATH_CASES
    scores = score_batch("math", [c[0] for c in cases], [c[1] for c in cases], num_workers=2)
    assert scores == [c[2] for c in cases]


def test_score_batch_survives_hung_crashed_and_failing_items(custom_module: str) -> None:
    responses = ["a", "hang", "b", "crash", "c", "raise", "none", "d"]
    answers = ["a", "x", "b", "x", "z", "x", "x", "d"]
    with RewardPool(f"{custom_module}:slow_if_asked", num_workers=2, timeout=1.0) as pool:
        start = time.monotonic()
        scores = pool.score(responses, answers)
        assert time.monotonic() - start < 10.0
        assert scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert pool.score(["q"], ["q"]) == [1.0]  # replacement workers serve the next call
        pool._workers[0].process.kill()  # a worker that dies while idle is replaced
        pool._workers[0].process.wait()
        assert pool.score(["q", "r"], ["q", "r"]) == [1.0, 1.0]


def test_pool_outlives_the_thread_that_started_it(custom_module: str) -> None:
    """Workers die with their parent process, not with the caller thread that started them."""
    with ThreadPoolExecutor(1) as ex:
        pool = ex.submit(RewardPool, f"{custom_module}:slow_if_asked", 1).result()
    try:
        time.sleep(0.2)
        assert pool.score(["a", "b"], ["a", "c"]) == [1.0, 0.0]
    finally:
        pool.close()


def test_score_batch_passes_prompt_and_metadata(custom_module: str) -> None:
    scores = score_batch(
        f"{custom_module}:with_context",
        ["r", "r"],
        ["a", "a"],
        prompts=["ab", "abc"],
        metadata=[{"bonus": 10}, None],
        num_workers=1,
    )
    assert scores == [12.0, 3.0]


def test_score_batch_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        score_batch("math", ["a", "b"], ["a"])


def test_pool_rejects_unpicklable_function() -> None:
    with pytest.raises(Exception, match="cannot be sent to a worker process"):
        RewardPool(lambda response, answer: 1.0, num_workers=1)


BY_MODE = "reward_helpers:by_mode"
MODES = [  # (metadata, expected score, failure kind)
    ({"mode": "ok", "value": 0.25, "echo": "p0"}, 0.25, None),
    ({"mode": "raise"}, 0.0, "errors"),
    ({"mode": "hang", "sleep_s": 0.6}, 0.0, "timeouts"),
    ({"mode": "string"}, 0.0, "errors"),
    ({"mode": "nan"}, 0.0, "errors"),
    ({"mode": "ok", "value": 0.75, "echo": "p5"}, 0.75, None),
]


def test_in_process_deadline_does_not_wait_for_a_hung_reward() -> None:
    """reward.workers=0: a reward that hangs for a minute costs the batch its deadline, not the
    minute; the items after it are still scored, in order."""
    from jaxrlhf.rewards import get_reward_fn, score_in_process

    metadata = [
        {"mode": "ok", "value": 0.5, "echo": "p0"},
        {"mode": "hang", "sleep_s": 60},
        {"mode": "ok", "value": 0.25, "echo": "p2"},
        {"mode": "hang", "sleep_s": 60},
        {"mode": "raise"},
        {"mode": "ok", "value": 1.0, "echo": "p5"},
    ]
    prompts = [f"p{i}" for i in range(len(metadata))]
    start = time.monotonic()
    report = score_in_process(get_reward_fn(BY_MODE), ["r"] * 6, ["a"] * 6, prompts=prompts,
                              metadata=metadata, timeout=0.3)  # fmt: skip
    assert time.monotonic() - start < 5.0
    assert report.scores == [0.5, 0.0, 0.25, 0.0, 0.0, 1.0]
    assert (report.timeouts, report.errors) == (2, 1)
    assert report.first_index == 1 and "deadline" in report.first_failure


@pytest.mark.parametrize("workers", [0, 2])
def test_failures_score_zero_and_are_counted(workers: int) -> None:
    """In process and in workers alike: raising, late, string and NaN items score 0 and are
    counted; the first failure in input order is the one reported; the prompt and metadata
    reach the function."""
    from jaxrlhf.rewards import RewardPool, get_reward_fn, score_in_process

    metadata = [m for m, _, _ in MODES]
    prompts = [f"p{i}" for i in range(len(MODES))]
    items = (["r"] * len(MODES), ["a"] * len(MODES))
    if workers:
        with RewardPool(BY_MODE, workers, timeout=0.3) as pool:
            report = pool.run(*items, prompts=prompts, metadata=metadata)
    else:
        fn = get_reward_fn(BY_MODE)
        report = score_in_process(fn, *items, prompts=prompts, metadata=metadata, timeout=0.3)
    assert report.scores == [s for _, s, _ in MODES]
    assert report.errors == sum(k == "errors" for _, _, k in MODES)
    assert report.timeouts == sum(k == "timeouts" for _, _, k in MODES)
    assert report.first_index == 1 and "ValueError: bad row 'p1'" in report.first_failure
