"""Format rewards: 1.0 when a response has the expected structure, else 0.0.

They ignore the reference answer. Chat templates that prefill ``<think>`` in the prompt make the
response start inside the thinking block, so the opening ``<think>`` tag is optional.
"""

from __future__ import annotations

import re

from jaxrlhf.rewards.answer_extraction import box_matches, last_boxed
from jaxrlhf.rewards.base import REWARDS

_THINK_RE = re.compile(r"\s*(?:<think>)?(?P<think>.*?)</think>(?P<rest>.*)", re.S)
_ANSWER_RE = re.compile(r"\s*<answer>(?P<answer>.*?)</answer>\s*", re.S)


def _split_think(response: str) -> tuple[str, str] | None:
    """(reasoning, rest) for exactly one non-empty think block at the start, else None."""
    if "</think>" not in response:
        return None
    m = _THINK_RE.fullmatch(response)
    if not m or "<think>" in m["think"] or "think>" in m["rest"] or not m["think"].strip():
        return None
    return m["think"], m["rest"]


@REWARDS.register("format_boxed")
def format_boxed(response: str, answer: str | None = None) -> float:
    """1.0 if the final part (after any ``</think>``) has exactly one balanced, non-empty box."""
    final = response.rsplit("</think>", 1)[-1]
    if len(box_matches(final)) != 1:
        return 0.0
    content = last_boxed(final)
    return 1.0 if content and content.strip() else 0.0


@REWARDS.register("format_think")
def format_think(response: str, answer: str | None = None) -> float:
    """1.0 for ``<think>reasoning</think>`` followed by a non-empty answer."""
    parts = _split_think(response)
    return 1.0 if parts is not None and parts[1].strip() else 0.0


@REWARDS.register("format_think_answer")
def format_think_answer(response: str, answer: str | None = None) -> float:
    """1.0 for ``<think>reasoning</think><answer>answer</answer>`` and nothing else."""
    parts = _split_think(response)
    if parts is None:
        return 0.0
    m = _ANSWER_RE.fullmatch(parts[1])
    ok = m is not None and m["answer"].strip() and "<answer>" not in m["answer"]
    return 1.0 if ok else 0.0
