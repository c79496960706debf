"""Scoring finished responses: one `Scorer` per run, used by training and evaluation alike.

``reward.workers: 0`` scores in this process; ``reward.workers: k`` in a `RewardPool` of k
worker processes, each response under a ``reward.timeout_s`` deadline (a worker whose reward
hangs is killed and replaced). Either way a response whose reward raises, returns a non-number
(a string, None, NaN, inf) or misses its deadline scores 0; the step's metrics count them
(``reward/errors``, ``reward/timeouts``) and the run's first failure is logged once. In this
process a reward still running at its deadline is abandoned (its thread runs on in the
background; the step does not wait for it); workers kill it instead (use them for rewards that
may hang).

The reward function gets the prompt text and the dataset row's other fields (``metadata``);
its scores are then multiplied by ``reward.scale`` and clipped to ``±reward.clip``.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from jaxrlhf.config import Config
from jaxrlhf.data.readers import PROMPT_TASKS
from jaxrlhf.registry import RegistryError
from jaxrlhf.rewards import (
    RewardFn,
    RewardLoadError,
    RewardPool,
    ScoreReport,
    get_reward_fn,
    math_reward,
    score_in_process,
)
from jaxrlhf.system.rollout import Trajectories

log = logging.getLogger(__name__)


def reward_function(cfg: Config) -> RewardFn:
    """``reward.fn`` if set; else the built-in task's exact checker, or the math verifier."""
    if cfg.reward.fn is not None:
        try:
            return get_reward_fn(cfg.reward.fn)
        except (RewardLoadError, RegistryError) as e:  # name the config key
            raise type(e)(f"reward.fn: {e}") from None
    task = cfg.data.train_path or "arithmetic"
    if task in PROMPT_TASKS:
        return get_reward_fn(PROMPT_TASKS.get(task)().score)
    return get_reward_fn(math_reward)


def _failed_sample(report: ScoreReport, traj: Trajectories) -> str:
    """The batch's first failure, naming its sample (indices from 0): ``"sample 5 (prompt 2,
    response 1; prompt '3+4='): ValueError: ..."``."""
    i, message = report.first_index, report.first_failure or ""
    if i is None:
        return message
    message = message.removeprefix(f"item {i}: ")
    prompt = traj.prompts[i] if i < len(traj.prompts) else ""
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    group = max(traj.group_size, 1)
    return f"sample {i} (prompt {i // group}, response {i % group}; prompt {shown!r}): {message}"


class Scorer:
    """The run's reward: ``reward.*`` applied to `Trajectories` (see the module docstring)."""

    def __init__(self, cfg: Config) -> None:
        r = cfg.reward
        self.scale, self.clip, self.timeout = r.scale, r.clip, r.timeout_s
        self.reward = reward_function(cfg)
        self.pool: RewardPool | None = None
        if r.workers > 0:
            self.pool = RewardPool(self.reward, r.workers, timeout=r.timeout_s)
            weakref.finalize(self, self.pool.close)  # a run that never reaches `close`
        self._warned = False

    def score(self, traj: Trajectories) -> tuple[np.ndarray, dict[str, float]]:
        """float32 ``[N]`` scores of ``traj``'s responses (also stored as ``traj.scores``) and
        this batch's ``reward/errors`` / ``reward/timeouts`` counts."""
        items = (traj.responses, traj.answers)
        context = {"prompts": traj.prompts, "metadata": traj.metadata}
        if self.pool is not None:
            report = self.pool.run(*items, **context)
        else:
            report = score_in_process(self.reward, *items, **context, timeout=self.timeout)
        if report.first_failure is not None and not self._warned:
            self._warned = True
            log.warning(
                "a reward failed and scored 0 (%s); later failures are not logged, "
                "reward/errors and reward/timeouts count them.",
                _failed_sample(report, traj),
            )
        scores = np.asarray(report.scores, np.float32) * self.scale
        if self.clip is not None:
            scores = np.clip(scores, -self.clip, self.clip)
        traj.scores = scores
        return scores, {"reward/errors": float(report.errors),
                        "reward/timeouts": float(report.timeouts)}  # fmt: skip

    def close(self) -> None:
        """Stop the reward workers, if any."""
        if self.pool is not None:
            self.pool.close()
