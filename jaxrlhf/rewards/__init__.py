"""Reward functions: math answers, formats, custom functions, and parallel scoring.

Every reward function has the signature::

    fn(response: str, answer: str, *, prompt: str | None = None,
       metadata: dict | None = None) -> float

``response`` is the generated text, ``answer`` the reference from the dataset (``data.answer_key``),
``prompt`` the prompt text and ``metadata`` the rest of the dataset row. A custom function may
leave out ``prompt`` and/or ``metadata`` (or take ``**kwargs``); it receives only what it declares.
It must be importable (a module-level function) so that worker processes can load it, and return
a float. Select one by name from a config:

- a built-in registered in ``REWARDS``: ``"math"``, ``"math_boxed"``, ``"format_boxed"``,
  ``"format_think"``, ``"format_think_answer"``;
- a custom function as ``"package.module:function"`` (resolved from ``sys.path``).

``get_reward_fn(name_or_path)`` returns the function with the full signature above;
``score_batch`` / ``RewardPool`` score many items in worker processes under a per-item deadline,
``score_in_process`` in this one; both report failures in a ``ScoreReport``.
"""

from jaxrlhf.rewards.answer_extraction import extract_answer, extract_reference
from jaxrlhf.rewards.answer_matching import REL_TOL, answers_match
from jaxrlhf.rewards.base import REWARDS, RewardFn, RewardLoadError, get_reward_fn
from jaxrlhf.rewards.format_rewards import format_boxed, format_think, format_think_answer
from jaxrlhf.rewards.math_rewards import math_boxed_reward, math_reward
from jaxrlhf.rewards.parallel import RewardPool, ScoreReport, score_batch, score_in_process
from jaxrlhf.rewards.symbolic import symbolic_equal
from jaxrlhf.rewards.worker import WorkerError

__all__ = [
    "REL_TOL",
    "REWARDS",
    "RewardFn",
    "RewardLoadError",
    "RewardPool",
    "ScoreReport",
    "WorkerError",
    "answers_match",
    "extract_answer",
    "extract_reference",
    "format_boxed",
    "format_think",
    "format_think_answer",
    "get_reward_fn",
    "math_boxed_reward",
    "math_reward",
    "score_batch",
    "score_in_process",
    "symbolic_equal",
]
