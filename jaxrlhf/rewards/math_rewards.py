"""Math answer rewards for GSM8K / MATH-style problems (1.0 correct, 0.0 otherwise)."""

from __future__ import annotations

from jaxrlhf.rewards.answer_extraction import extract_answer, extract_reference
from jaxrlhf.rewards.answer_matching import answers_match
from jaxrlhf.rewards.base import REWARDS


@REWARDS.register("math")
def math_reward(
    response: str, answer: str, *, timeout: float = 5.0, require_boxed: bool = False
) -> float:
    """1.0 if the final answer of ``response`` equals the reference ``answer``, else 0.0.

    ``answer`` may be a bare answer (``"42"``, ``"\\frac{3}{4}"``), GSM8K solution text ending in
    ``#### 42``, or a solution with a ``\\boxed{}`` answer. Extraction rules are in
    :mod:`jaxrlhf.rewards.answer_extraction`, comparison rules (exact numbers, a tolerance only
    for decimal approximations, symbolic equivalence) in :mod:`jaxrlhf.rewards.answer_matching`;
    ``tests/data/math_equivalence_cases.jsonl`` holds the cases they are held to. ``timeout``
    bounds the symbolic check in seconds (it is killed, and scores 0.0, past it);
    ``require_boxed`` gives credit only to an answer inside ``\\boxed{}``.
    """
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)  # a dataset column of numbers
    if not isinstance(response, str) or not isinstance(answer, str):
        return 0.0
    pred = extract_answer(response, boxed_only=require_boxed)
    if not pred:
        return 0.0
    gold = extract_reference(answer)
    return 1.0 if answers_match(pred, gold, timeout=timeout) else 0.0


@REWARDS.register("math_boxed")
def math_boxed_reward(response: str, answer: str, *, timeout: float = 5.0) -> float:
    """:func:`math_reward` that credits only an answer given in ``\\boxed{}``."""
    return math_reward(response, answer, timeout=timeout, require_boxed=True)


math_reward.needs_symbolic = True  # type: ignore[attr-defined]
math_boxed_reward.needs_symbolic = True  # type: ignore[attr-defined]
