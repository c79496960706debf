"""The math reward against a table of equivalence cases modelled on other projects' test suites.

``tests/data/math_equivalence_cases.jsonl`` holds one case a line: ``prediction`` (a model
response), ``gold`` (the reference), ``expected`` (does the prediction earn the reward),
``source_project`` (the suite whose kind of expectation it follows: math-verify, inspect-ai,
NeMo-Skills, hendrycks/math, SkyRL, slime, verl), ``kind`` and ``convention`` (true where the
expectation is a convention that projects differ on: ``1/2`` against ``0.5``, a bare ``28``
against ``28%``, an unordered list, a decimal comma). The cases are written in our own words.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from jaxrlhf.rewards import math_reward

CASES_PATH = Path(__file__).parent / "data" / "math_equivalence_cases.jsonl"
MIN_AGREEMENT = 0.97  # on the cases whose expectation is not a convention
PROJECTS = {"math-verify", "inspect-ai", "nemo-skills", "hendrycks-math", "skyrl", "slime", "verl"}


def _load() -> list[dict]:
    with CASES_PATH.open() as f:
        return [json.loads(line) for line in f if line.strip()]


CASES = _load()


def _is_integer(text: str) -> bool:
    try:
        return Fraction(text.replace(",", "")).denominator == 1
    except ValueError:
        return False


@pytest.fixture(scope="module")
def results() -> list[tuple[dict, bool]]:
    return [(c, math_reward(c["prediction"], c["gold"]) == 1.0) for c in CASES]


def test_table_is_well_formed() -> None:
    keys = {"prediction", "gold", "expected", "source_project", "kind", "convention"}
    assert all(set(c) == keys for c in CASES)
    assert all(isinstance(c["expected"], bool) and isinstance(c["convention"], bool) for c in CASES)
    assert len({(c["prediction"], c["gold"]) for c in CASES}) == len(CASES)  # no duplicates
    counts = Counter(c["source_project"] for c in CASES)
    assert set(counts) == PROJECTS and min(counts.values()) >= 20
    assert 400 <= len(CASES) <= 700


def test_agreement(results: list[tuple[dict, bool]]) -> None:
    plain = [(c, got) for c, got in results if not c["convention"]]
    agree_plain = sum(got == c["expected"] for c, got in plain) / len(plain)
    agree_all = sum(got == c["expected"] for c, got in results) / len(results)
    by_project = {
        p: sum(got == c["expected"] for c, got in plain if c["source_project"] == p)
        / max(1, sum(c["source_project"] == p for c, _ in plain))
        for p in sorted(PROJECTS)
    }
    print(
        f"\nmath equivalence: {agree_all:.1%} of {len(results)} cases agree; "
        f"{agree_plain:.1%} of {len(plain)} non-convention cases"
    )
    print("  " + ", ".join(f"{p} {a:.0%}" for p, a in by_project.items()))
    wrong = [
        f"  {c['source_project']}/{c['kind']}: {c['prediction']!r} vs {c['gold']!r}: "
        f"expected {c['expected']}, got {got}"
        for c, got in plain
        if got != c["expected"]
    ]
    assert agree_plain >= MIN_AGREEMENT, "disagreements:\n" + "\n".join(wrong)


def test_no_false_positive_on_integer_golds(results: list[tuple[dict, bool]]) -> None:
    """A wrong answer to an integer question never scores, whatever its size."""
    wrong = [c for c, got in results if _is_integer(c["gold"]) and got and not c["expected"]]
    assert len([c for c in CASES if _is_integer(c["gold"]) and not c["expected"]]) >= 60
    assert not wrong, wrong


def test_sympy_fallback_never_credits_a_wrong_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without math_verify (the sympy fallback, checked in-process) the table still agrees on
    at least 95% and no wrong answer scores."""
    from jaxrlhf.rewards import symbolic

    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify -> ImportError
    monkeypatch.setattr(symbolic, "_inline", True)
    plain = [c for c in CASES if not c["convention"]]
    got = [math_reward(c["prediction"], c["gold"]) == 1.0 for c in plain]
    false_positives = [c for c, g in zip(plain, got, strict=True) if g and not c["expected"]]
    assert not false_positives, false_positives
    agreement = sum(g == c["expected"] for c, g in zip(plain, got, strict=True)) / len(plain)
    print(f"\nsympy fallback: {agreement:.1%} of {len(plain)} non-convention cases")
    assert agreement >= 0.95


@pytest.mark.parametrize("gold", [10**k for k in range(3, 19)] + [123456700, 2**31 - 1, 2**63])
def test_integer_neighbours_never_match(gold: int) -> None:
    """Off-by-one answers in every written form score 0; the right one scores 1 (brute force over
    the neighbours, including forms the table does not list)."""
    for delta in (-2, -1, 1, 2):
        wrong = gold + delta
        for response in (
            rf"\boxed{{{wrong}}}",
            f"The answer is {wrong:,}.",
            f"#### {wrong}",
            rf"\boxed{{{wrong:,}}}".replace(",", r"{,}"),
            rf"\boxed{{{wrong:,}}}".replace(",", r"\,"),
            f"The answer is {wrong:,}".replace(",", " "),
            f"{wrong}.0",
        ):
            assert math_reward(response, str(gold)) == 0.0, (response, gold)
    assert math_reward(rf"\boxed{{{gold:,}}}", str(gold)) == 1.0
    assert math_reward(f"The answer is {gold}.", f"{gold:,}") == 1.0
