"""Algorithms as the system uses them: the loss spec's aggregation, the advantages MFC (overlong
penalty, truncation) and a new estimator / policy loss / reward registered from this file alone
and trained for one real step."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_algorithms import brute_force_gae
from test_ppo_e2e import _config

from jaxrlhf import algorithms as alg
from jaxrlhf.config import ConfigError, load_config
from jaxrlhf.dfg import build_graph, run_mfc
from jaxrlhf.rewards import REWARDS
from jaxrlhf.system.mfcs import Advantages
from jaxrlhf.system.specs import actor_loss_spec

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "configs" / "grpo_gsm8k_qwen2.5_0.5b.yaml"


# --- the actor loss spec --------------------------------------------------------------------


def _spec(*overrides: str):
    cfg = load_config(GSM8K, list(overrides))
    return actor_loss_spec(cfg.algorithm, max_new_tokens=cfg.generation.max_new_tokens)


def test_loss_spec_aggregation_defaults():
    # Dr.GRPO divides by max_new_tokens (512 here), not the padded prompt + response width (768).
    spec = _spec("algorithm.advantage_estimator=dr_grpo", "algorithm.loss_agg=null")
    assert (spec.aggregation, spec.norm_constant) == ("seq_mean_token_sum_norm", 512.0)
    # GSPO gets its sequence-level aggregation without touching loss_agg.
    spec = _spec("algorithm.policy_loss=gspo", "algorithm.loss_agg=null")
    assert (spec.aggregation, spec.norm_constant) == ("seq_mean_token_mean", None)
    spec = _spec("algorithm.loss_agg=null")
    assert (spec.aggregation, spec.norm_constant) == ("token_mean", None)
    assert _spec().aggregation == "token_mean"  # the file's explicit choice wins
    with pytest.raises(ConfigError, match=r"contradicts algorithm\.policy_loss 'gspo'"):
        _spec("algorithm.policy_loss=gspo", "algorithm.loss_agg=token_mean")


# --- the advantages MFC ---------------------------------------------------------------------


def _rollout(rng, resp_lens, prompt_lens):
    """Token-aligned per-sample fields of a fake rollout (prompt tokens have mask 0)."""
    data = {"input_ids": [], "response_mask": [], "values": []}
    for p, r in zip(prompt_lens, resp_lens, strict=True):
        data["input_ids"].append(rng.integers(1, 50, p + r))
        data["response_mask"].append(np.r_[np.zeros(p), np.ones(r)].astype(np.int32))
        data["values"].append(rng.normal(size=p + r).astype(np.float32))
    return data


@pytest.mark.parametrize("truncation", ["null", "terminal"])
def test_advantages_mfc_applies_overlong_penalty_and_truncation(truncation):
    width, buffer, factor, gamma, lam = 6, 3, 0.5, 0.9, 0.8
    cfg = load_config(None, [
        "algorithm.advantage_estimator=gae", "critic.enabled=true", "algorithm.adv_norm=false",
        f"generation.max_new_tokens={width}", f"algorithm.overlong_buffer_len={buffer}",
        f"algorithm.overlong_penalty_factor={factor}", f"algorithm.gamma={gamma}",
        f"algorithm.lam={lam}", f"algorithm.truncation={truncation}",
    ])  # fmt: skip
    mfc = build_graph(cfg)["advantages"]
    rng = np.random.default_rng(40)
    resp_lens = np.array([6, 3, 5, 6, 1, 4])
    data = _rollout(rng, resp_lens, prompt_lens=[3, 5, 2, 4, 6, 1])
    data["scores"] = rng.normal(size=6).astype(np.float32)
    data["truncated"] = np.array([True, False, False, False, False, False])  # row 3 ended (EOS)
    ctx = SimpleNamespace(cfg=cfg, metrics={})
    out, read = run_mfc(mfc, Advantages, ctx, data)
    bootstrap = truncation == "null"  # null: bootstrap, since gae has a critic
    assert ("truncated" in read) == bootstrap
    # NumPy reference: DAPO's penalty on the score, then a brute-force GAE loop.
    start = width - buffer
    penalty = factor * np.clip((start - resp_lens) / buffer, -1.0, 0.0)
    assert penalty[0] == -factor and penalty[1] == 0.0
    assert penalty[2] == pytest.approx(-factor * 2 / 3)
    assert ctx.metrics["reward/overlong_penalty_mean"] == pytest.approx(penalty.mean())
    n = len(resp_lens)
    mask = np.arange(width)[None, :] < resp_lens[:, None]
    rewards, values = np.zeros((n, width)), np.zeros((n, width))
    for i, length in enumerate(resp_lens):
        rewards[i, length - 1] = data["scores"][i] + penalty[i]
        values[i, :length] = data["values"][i][data["response_mask"][i] > 0]
    boot = data["truncated"] if bootstrap else np.zeros(n, bool)
    want_adv, want_ret = brute_force_gae(rewards, values, mask, gamma, lam, boot)
    for i in range(n):
        resp = data["response_mask"][i] > 0
        close = dict(rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["advantages"][i][resp], want_adv[i, mask[i]], **close)
        np.testing.assert_allclose(out["returns"][i][resp], want_ret[i, mask[i]], **close)
        assert np.all(out["advantages"][i][~resp] == 0)
    last = resp_lens[0] - 1  # the truncated row's return includes γ·V at the cut, or not
    cut = want_ret[0, last] - rewards[0, last]
    assert cut == pytest.approx(gamma * values[0, last] if bootstrap else 0.0)


# --- a new estimator, policy loss and reward, from this file alone --------------------------


def baseline_free_reinforce(rewards_bt, mask_bt, *, values_bt=None, group_size=1, gamma=1.0,
                            lam=1.0, eps=1e-6):  # fmt: skip
    """A_t = G_t, the discounted return-to-go: REINFORCE with no baseline."""
    returns = alg.returns_to_go(rewards_bt, mask_bt, gamma)
    return returns, returns


def plain_policy_gradient(logp_bt, proximal_logp_bt, behaviour_logp_bt, advantages_bt, mask_bt,
                          *, eps_clip, aggregation="token_mean", denominators=None,
                          norm_constant=None, **unused):  # fmt: skip
    """−A·r with r = π/sg(π_old), no clipping; reports the advantages it saw (``sum_*`` metrics
    are summed over micro-batches)."""
    valid = mask_bt > 0
    log_ratio = jnp.where(valid, logp_bt - jax.lax.stop_gradient(proximal_logp_bt), 0.0)
    loss = alg.aggregate(-advantages_bt * jnp.exp(log_ratio), mask_bt, aggregation,
                         denominators=denominators, norm_constant=norm_constant)  # fmt: skip
    adv = jnp.where(valid, advantages_bt, 0.0)
    metrics = {"loss": loss, "tokens": jnp.sum(valid, dtype=jnp.float32),
               "sum_test_adv": jnp.sum(adv), "sum_test_adv_sq": jnp.sum(adv * adv)}  # fmt: skip
    return loss, metrics


SCORED: list[float] = []


def digit_reward(response: str, answer: str) -> float:
    """Nonzero on most responses, so the estimator has something to propagate."""
    value = 0.25 * sum(c.isdigit() for c in response) + (response.strip() == answer.strip())
    SCORED.append(float(value))
    return float(value)


@pytest.fixture
def registered():
    alg.register_advantage_estimator(
        "test_reinforce", baseline_free_reinforce, label="REINFORCE", needs_values=False,
        group=False,
    )  # fmt: skip
    alg.register_policy_loss("test_pg", plain_policy_gradient)
    REWARDS.register("test_digits", digit_reward)
    SCORED.clear()
    yield
    alg.ADVANTAGE_ESTIMATORS.unregister("test_reinforce")
    alg.POLICY_LOSSES.unregister("test_pg")
    REWARDS.unregister("test_digits")


class Spy:
    """Wraps an MFC implementation and records each call's declared inputs and outputs."""

    def __init__(self, impl, calls: list):
        self.impl, self.calls = impl, calls

    def __getattr__(self, interface_type):
        method = getattr(self.impl, interface_type)

        def call(ctx, mfc, data):
            out = method(ctx, mfc, data)
            self.calls.append(({k: data[k] for k in mfc.inputs if k in data}, out))
            return out

        return call


def test_registered_estimator_loss_and_reward_train_a_step(tmp_path, registered):
    from jaxrlhf.system.coordinator import PPOCoordinator

    gamma = 0.9
    cfg = _config(
        tmp_path, "sft_warmup.steps=0", "experiment.total_steps=1", "critic.enabled=false",
        "ref.enabled=false", "algorithm.advantage_estimator=test_reinforce",
        "algorithm.policy_loss=test_pg", "reward.fn=test_digits", f"algorithm.gamma={gamma}",
    )  # fmt: skip
    coordinator = PPOCoordinator(cfg)
    assert coordinator.graph.name.startswith("REINFORCE, sync")
    assert "values" not in coordinator.graph["advantages"].inputs
    adv_calls, train_calls = [], []
    coordinator.impls["advantages"] = Spy(coordinator.impls["advantages"], adv_calls)
    coordinator.impls["actor_train"] = Spy(coordinator.impls["actor_train"], train_calls)
    metrics = coordinator.train_step()
    (adv_in, adv_out), (train_in, _) = adv_calls[0], train_calls[0]
    # The reward registered here scored every response.
    scores = np.asarray(adv_in["scores"])
    assert len(SCORED) == len(scores) and np.any(scores != 0)
    np.testing.assert_allclose(np.sort(scores), np.sort(SCORED), rtol=1e-6)
    # The estimator's output equals the NumPy reference: score · γ^(tokens after this one).
    total = total_sq = 0.0
    for i, (mask, adv) in enumerate(zip(adv_in["response_mask"], adv_out["advantages"],
                                        strict=True)):  # fmt: skip
        resp = np.flatnonzero(np.asarray(mask) > 0)
        want = scores[i] * gamma ** (len(resp) - 1 - np.arange(len(resp)))
        np.testing.assert_allclose(adv[resp], want, rtol=1e-5, atol=1e-7)
        total, total_sq = total + want.sum(), total_sq + (want**2).sum()
    # ... it is what the actor update received, and what the new policy loss saw inside the step.
    assert train_in["advantages"] is adv_out["advantages"]
    assert metrics["actor/sum_test_adv"] == pytest.approx(total, rel=1e-5, abs=1e-6)
    assert metrics["actor/sum_test_adv_sq"] == pytest.approx(total_sq, rel=1e-5, abs=1e-6)
    assert np.isfinite(metrics["actor/grad_norm"]) and metrics["actor/grad_norm"] > 0
