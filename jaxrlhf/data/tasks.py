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

    With ``eval_every`` = k > 0 the problem space is split once, deterministically: every k-th
    problem (in a fixed shuffled order) belongs to the eval split and never appears in training,
    so eval reward measures generalisation to unseen problems. With 0 (the default) the eval
    split is the whole space, so eval reward is the greedy accuracy over every problem, and
    training prompts are random draws from the same space. Responses are scored by `score`: 1.0
    when the text before the first EOS, stripped, is exactly the answer.
    """

    max_operand: int = 9
    ops: tuple[str, ...] = ("+", "-")
    eval_every: int = 0

    def all_problems(self, split: str = "train") -> list[Problem]:
        """Every problem of ``split`` ("train" or "eval"), in a fixed order."""
        values = range(self.max_operand + 1)
        space = [(a, op, b) for op in self.ops for a in values for b in values]
        order = np.random.default_rng(12345).permutation(len(space))
        if self.eval_every == 0:
            return [self._problem(*space[j]) for j in order]
        held_out = [i % self.eval_every == 0 for i in range(len(space))]
        chosen = [space[j] for i, j in enumerate(order) if held_out[i] == (split == "eval")]
        return [self._problem(a, op, b) for a, op, b in chosen]

    @staticmethod
    def _problem(a: int, op: str, b: int) -> Problem:
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(prompt=f"{a}{op}{b}=", answer=str(value))

    def problems(self, n: int, seed: int, split: str = "train") -> list[Problem]:
        """``n`` problems of ``split`` drawn (with replacement) reproducibly from ``seed``."""
        pool = self.all_problems(split)
        rng = np.random.default_rng(seed)
        return [pool[int(i)] for i in rng.integers(len(pool), size=n)]

    @staticmethod
    def score(response: str, answer: str) -> float:
        return 1.0 if response.strip() == answer else 0.0
