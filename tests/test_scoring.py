"""Scoring through the run's `Scorer`: the reward pool inside a PPO step (failing, hanging and
string-returning rows score 0 and are counted, the first failure is logged once per run, the
prompt and the row's metadata reach the reward), and evaluation scored exactly as training."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from toy import toy_config

from jaxrlhf.rewards.base import REWARDS
from jaxrlhf.system.coordinator import PPOCoordinator
from jaxrlhf.system.rollout import Trajectories
from jaxrlhf.system.scoring import Scorer

TINY = [
    "generation.n_samples=2", "generation.max_new_tokens=3", "sft_warmup.steps=0",
    "ref.enabled=false",
    "reward.fn=reward_helpers:by_mode", "reward.scale=2.0", "reward.clip=1.2",
]  # fmt: skip
# One row per outcome; `by_mode` scores an "ok" row with its `value` (if the prompt reached it).
ROWS = [
    {"mode": "ok", "value": 0.25},
    {"mode": "raise"},
    {"mode": "hang", "sleep_s": 60},
    {"mode": "string"},
    {"mode": "ok", "value": 0.75},
]
RAW = np.asarray([0.25, 0.0, 0.0, 0.0, 0.75], np.float32)
EXPECTED = np.clip(RAW * 2.0, -1.2, 1.2)  # reward.scale, reward.clip


@REWARDS.register("test_scoring_half")
def _half(response: str, answer: str) -> float:
    return 0.5


def _dataset(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "echo": f"{i}+1=", **r}
            for i, r in enumerate(ROWS)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path: Path, *extra: str):
    data = _dataset(tmp_path)
    return toy_config(
        tmp_path / "run", *TINY, f"data.train_path={data}", f"data.eval_path={data}",
        f"data.batch_size={len(ROWS)}", "data.shuffle=false", "data.eval_size=8", *extra,
    )  # fmt: skip


def test_ppo_step_scores_through_the_reward_pool(tmp_path, caplog):
    """reward.workers=2: a PPO step's scores are 0 where the reward raised, hung past
    reward.timeout_s or returned a string, scaled and clipped elsewhere; the metrics count the
    failures; evaluation scores the same way; the first failure is logged once in the run."""
    cfg = _config(tmp_path, "reward.workers=2", "reward.timeout_s=1.0")
    coord = PPOCoordinator(cfg)
    try:
        assert coord.scorer.pool is not None
        with caplog.at_level(logging.WARNING, logger="jaxrlhf.system.scoring"):
            metrics = coord.train_step()
            evaluation = coord.evaluate()
    finally:
        coord.close()
    n = cfg.generation.n_samples
    np.testing.assert_allclose(coord.last_trajectories.scores, np.repeat(EXPECTED, n))
    assert metrics["reward/errors"] == 2 * n  # "raise" and "string", each sample
    assert metrics["reward/timeouts"] == n
    np.testing.assert_allclose(metrics["reward/mean"], EXPECTED.mean(), rtol=1e-6)
    np.testing.assert_allclose(evaluation["eval/reward"], EXPECTED.mean(), rtol=1e-6)
    warnings = [r for r in caplog.records if r.name == "jaxrlhf.system.scoring"]
    assert len(warnings) == 1
    assert "ValueError: bad row '1+1='" in warnings[0].getMessage()


def test_in_process_scorer_counts_failures_and_late_results(tmp_path):
    """reward.workers=0: the same scores and counts as the pool; a result that comes back past
    reward.timeout_s scores 0 and counts as a timeout."""
    rows = [r if r["mode"] != "hang" else {"mode": "hang", "sleep_s": 0.5} for r in ROWS]
    cfg = _config(tmp_path, "reward.timeout_s=0.2")
    scorer = Scorer(cfg)
    assert scorer.pool is None
    prompts = [f"{i}+1=" for i in range(len(rows))]
    traj = Trajectories(
        input_ids=[], response_mask=[], behav_logprobs=[], versions=[],
        prompt_lens=np.zeros(0), response_lens=np.zeros(0), truncated=np.zeros(0),
        prompts=prompts, responses=["r"] * len(rows), answers=["a"] * len(rows),
        metadata=[{"echo": p, **r} for p, r in zip(prompts, rows, strict=True)], group_size=1,
    )  # fmt: skip
    scores, counts = scorer.score(traj)
    np.testing.assert_allclose(scores, EXPECTED)
    assert counts == {"reward/errors": 2.0, "reward/timeouts": 1.0}


def test_evaluate_applies_reward_scale_and_clip(tmp_path):
    """`PPOCoordinator.evaluate` scores as training does (it used to report the raw reward)."""
    cfg = _config(tmp_path, "data.train_path=null", "data.eval_path=null", "data.batch_size=4",
                  "reward.fn=test_scoring_half", "reward.clip=0.9")  # fmt: skip
    coord = PPOCoordinator(cfg)
    try:
        evaluation = coord.evaluate()
    finally:
        coord.close()
    assert evaluation["eval/reward"] == pytest.approx(0.9)  # 0.5 x reward.scale 2, clipped
