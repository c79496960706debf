"""Built-in synthetic tasks with exact answer checkers (the embedded default needs no download)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    """One prompt and the exact answer its response should contain."""

    prompt: str
    answer: str


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """``a+b=`` style problems over integers in ``[0, max_operand]``.

    Responses are scored by `score`: 1.0 when the text before the first EOS, stripped, is
    exactly the answer.
    """

    max_operand: int = 20
    ops: tuple[str, ...] = ("+", "-")

    def problem(self, rng: np.random.Generator) -> Problem:
        a, b = (int(x) for x in rng.integers(0, self.max_operand + 1, size=2))
        op = self.ops[int(rng.integers(len(self.ops)))]
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(prompt=f"{a}{op}{b}=", answer=str(value))

    def problems(self, n: int, seed: int) -> list[Problem]:
        """``n`` problems drawn reproducibly from ``seed``."""
        rng = np.random.default_rng(seed)
        return [self.problem(rng) for _ in range(n)]

    @staticmethod
    def score(response: str, answer: str) -> float:
        return 1.0 if response.strip() == answer else 0.0
