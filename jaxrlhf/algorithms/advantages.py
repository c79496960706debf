"""Advantage estimators (GAE, GRPO, Dr.GRPO, RLOO, REINFORCE++) and reward shaping.

Conventions:

- Token grids are ``[batch, time]``; only tokens with ``mask_bt > 0`` exist. Padding (left,
  right or in the middle) is skipped by the backward recursions, so a padded response gets the
  same advantages as the unpadded one; outputs are 0 on padding.
- Episodes end at a sequence's last valid token: the value after it is 0 (terminal). A response
  cut at the length limit may instead bootstrap (GAE's ``bootstrap_b``: the value after the cut
  is the critic's), or be penalised through its score (see `overlong_penalty`).
- Group methods need the ``group_size`` samples of one prompt in consecutive rows.

Every estimator in `ADVANTAGE_ESTIMATORS` has the signature::

    fn(rewards_bt, mask_bt, *, values_bt=None, group_size=1, gamma=1.0, lam=1.0, eps=1e-6)
        -> (advantages_bt, returns_bt)

where ``rewards_bt`` are token rewards (build them with `scores_to_token_rewards` plus an
optional `kl_reward_penalty`). Estimators registered with ``needs_values`` also take
``bootstrap_b`` (rows whose last token is not terminal). Group estimators reduce the rewards to
one score per sequence (their sum); their returns equal the advantages (there is no critic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.algorithms._checks import (
    check_rank,
    check_rows,
    check_same_shape,
    compute_dtype,
    is_number,
)
from jaxrlhf.algorithms.aggregation import masked_whiten
from jaxrlhf.algorithms.registries import register_advantage_estimator

GROUP_METHODS = ("grpo", "dr_grpo", "rloo")


def _reverse_scan_bt(step, init_b, xs_bt: tuple[jax.Array, ...]) -> jax.Array:
    """Run ``step`` from the last time step to the first over ``[B, T]`` inputs; out ``[B, T]``."""
    xs_tb = tuple(x.T for x in xs_bt)
    _, out_tb = jax.lax.scan(step, init_b, xs_tb, reverse=True)
    return out_tb.T


def last_valid(x_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """``x`` at each row's last valid token, ``[B]`` (0 for a row without any)."""
    valid = mask_bt > 0
    length = valid.shape[1]
    last_b = length - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    picked = jnp.take_along_axis(x_bt, last_b[:, None], axis=1)[:, 0]
    return jnp.where(jnp.any(valid, axis=1), picked, 0)


def gae(
    rewards_bt: jax.Array,
    values_bt: jax.Array,
    mask_bt: jax.Array,
    gamma: float,
    lam: float,
    *,
    bootstrap_b: jax.Array | None = None,
    bootstrap_values_b: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over valid tokens; returns (advantages, returns).

    δ_t = r_t + γ V_next − V_t, A_t = δ_t + γλ A_next, returns = A + V, where "next" is the
    next *valid* token of the same row. After a row's last token A_next = 0 and V_next = 0
    (terminal), except on rows where ``bootstrap_b`` is set (a response cut at the length limit):
    there V_next = ``bootstrap_values_b``, by default the row's value at its last token (the
    nearest state to the cut that token-aligned values hold), so its return includes γ V.
    """
    check_same_shape("gae", 2, rewards_bt=rewards_bt, values_bt=values_bt, mask_bt=mask_bt)
    check_rows("gae", "bootstrap_b", bootstrap_b, "mask_bt", mask_bt)
    check_rows("gae", "bootstrap_values_b", bootstrap_values_b, "mask_bt", mask_bt)
    dtype = compute_dtype(rewards_bt, values_bt)
    valid = mask_bt > 0
    r = jnp.where(valid, rewards_bt.astype(dtype), 0.0)
    v = jnp.where(valid, values_bt.astype(dtype), 0.0)

    def step(carry, xs):
        next_v, next_a = carry
        r_t, v_t, m_t = xs
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        a_t = jnp.where(m_t, a_t, 0.0)
        # Padding passes the carry through untouched: it is as if the token were not there.
        return (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a)), a_t

    zeros_b = jnp.zeros(r.shape[:1], dtype)
    after_b = zeros_b  # the value after each row's last valid token
    if bootstrap_b is not None:
        boot_v = last_valid(v, mask_bt) if bootstrap_values_b is None else bootstrap_values_b
        after_b = jnp.where(jnp.asarray(bootstrap_b) > 0, boot_v.astype(dtype), 0.0)
    adv = _reverse_scan_bt(step, (after_b, zeros_b), (r, v, valid))
    return adv, jnp.where(valid, adv + v, 0.0)


def returns_to_go(rewards_bt: jax.Array, mask_bt: jax.Array, gamma: float = 1.0) -> jax.Array:
    """G_t = r_t + γ G_next over valid tokens (padding skipped, 0 after the last valid token)."""
    check_same_shape("returns_to_go", 2, rewards_bt=rewards_bt, mask_bt=mask_bt)
    valid = mask_bt > 0
    r = jnp.where(valid, rewards_bt.astype(compute_dtype(rewards_bt)), 0.0)

    def step(next_g, xs):
        r_t, m_t = xs
        g_t = r_t + gamma * next_g
        return jnp.where(m_t, g_t, next_g), jnp.where(m_t, g_t, 0.0)

    return _reverse_scan_bt(step, jnp.zeros(r.shape[:1], r.dtype), (r, valid))


def group_advantages(
    scores_b: jax.Array,
    group_size: int,
    method: str = "grpo",
    *,
    eps: float = 1e-6,
) -> jax.Array:
    """Per-sequence advantages relative to the other samples of the same prompt.

    Rows ``[k·G, (k+1)·G)`` form group k. ``grpo``: (r − mean) / (std + eps) with the unbiased
    (n − 1) std (0 for G = 1); ``dr_grpo``: r − mean; ``rloo``: r − mean of the *other* G − 1
    samples (needs G >= 2).
    """
    fn = "group_advantages"
    check_rank(fn, "scores_b [batch]", scores_b, 1)
    if method not in GROUP_METHODS:
        raise ValueError(f"{fn}: method must be one of {GROUP_METHODS}, got {method!r}.")
    batch = scores_b.shape[0]
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{fn}: group_size must be a positive int, got {group_size!r}.")
    if batch % group_size:
        raise ValueError(
            f"{fn}: batch of {batch} sequences is not divisible by group_size {group_size}."
        )
    if method == "rloo" and group_size < 2:
        raise ValueError(f"{fn}: rloo needs group_size >= 2, got {group_size}.")
    g = scores_b.astype(compute_dtype(scores_b)).reshape(batch // group_size, group_size)
    # Shift by the group's first score (which changes no difference): equal scores become exact
    # zeros, so an equal group's mean, std and advantages are exactly 0, where the rounding error
    # of a float mean (e.g. of eight 0.97s) divided by std + eps would give about ±0.1.
    d = g - g[:, :1]
    mean = jnp.mean(d, axis=1, keepdims=True)
    if method == "dr_grpo":
        adv = d - mean
    elif method == "rloo":
        others_mean = (jnp.sum(d, axis=1, keepdims=True) - d) / (group_size - 1)
        adv = d - others_mean
    else:
        std = jnp.std(d, axis=1, keepdims=True, ddof=1) if group_size > 1 else jnp.zeros_like(d)
        adv = (d - mean) / (std + eps)
    return adv.reshape(batch)


def reinforce_pp_advantages(
    rewards_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    gamma: float = 1.0,
    eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array]:
    """REINFORCE++: returns-to-go of the (KL-penalised) token rewards, whitened over every valid
    token of the batch; returns (advantages, returns_to_go)."""
    returns = returns_to_go(rewards_bt, mask_bt, gamma)
    return masked_whiten(returns, mask_bt, eps), returns


def scores_to_token_rewards(scores_b: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Place each sequence's scalar score on its last valid token (rows without any: dropped)."""
    check_rows("scores_to_token_rewards", "scores_b", scores_b, "mask_bt", mask_bt)
    valid = mask_bt > 0
    length = valid.shape[1]
    last_b = length - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    hit_bt = (jnp.arange(length)[None, :] == last_b[:, None]) & valid
    scores = scores_b.astype(compute_dtype(scores_b))
    return jnp.where(hit_bt, scores[:, None], 0.0)


def scale_and_clip_rewards(
    rewards: jax.Array,
    *,
    scale: float = 1.0,
    shift: float = 0.0,
    clip: float | None = None,
) -> jax.Array:
    """rewards · scale + shift, then clipped to [−clip, clip] when ``clip`` is given."""
    if clip is not None and is_number(clip) and clip <= 0:
        raise ValueError(f"scale_and_clip_rewards: clip must be > 0, got {clip}.")
    out = rewards.astype(compute_dtype(rewards)) * scale + shift
    return out if clip is None else jnp.clip(out, -clip, clip)


def overlong_penalty(
    lengths_b: jax.Array,
    *,
    max_length: int,
    buffer_length: int,
    penalty: float = 1.0,
) -> jax.Array:
    """DAPO soft overlong punishment, to add to the scores (values in [−penalty, 0]).

    0 up to ``max_length − buffer_length`` tokens, then falling linearly to −penalty at
    ``max_length``, and −penalty beyond it.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(
            f"overlong_penalty: need 0 < buffer_length <= max_length, got buffer_length "
            f"{buffer_length} and max_length {max_length}."
        )
    check_rank("overlong_penalty", "lengths_b [batch]", lengths_b, 1)
    start = max_length - buffer_length
    lengths = jnp.asarray(lengths_b).astype(jnp.float32)
    return penalty * jnp.clip((start - lengths) / buffer_length, -1.0, 0.0)


# --- registry entries with the uniform estimator signature -----------------------------------


@register_advantage_estimator("gae", label="PPO", needs_values=True, group=False, adv_norm=True)
def gae_estimator(
    rewards_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    values_bt: jax.Array | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
    bootstrap_b: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`gae` (needs ``values_bt`` from the critic; ``bootstrap_b``: truncated rows)."""
    if values_bt is None:
        raise ValueError("advantage estimator 'gae' needs values_bt (a critic), got None.")
    return gae(rewards_bt, values_bt, mask_bt, gamma, lam, bootstrap_b=bootstrap_b)


@register_advantage_estimator("reinforce_pp", label="REINFORCE++", needs_values=False, group=False)
def reinforce_pp_estimator(
    rewards_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    values_bt: jax.Array | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array]:
    """`reinforce_pp_advantages`."""
    return reinforce_pp_advantages(rewards_bt, mask_bt, gamma=gamma, eps=eps)


def _group_estimator(method: str):
    def estimate(
        rewards_bt: jax.Array,
        mask_bt: jax.Array,
        *,
        values_bt: jax.Array | None = None,
        group_size: int = 1,
        gamma: float = 1.0,
        lam: float = 1.0,
        eps: float = 1e-6,
    ) -> tuple[jax.Array, jax.Array]:
        check_same_shape(method, 2, rewards_bt=rewards_bt, mask_bt=mask_bt)
        valid = mask_bt > 0
        scores_b = jnp.sum(jnp.where(valid, rewards_bt, 0.0), axis=-1)
        adv_b = group_advantages(scores_b, group_size, method, eps=eps)
        adv_bt = jnp.where(valid, adv_b[:, None], 0.0)
        return adv_bt, adv_bt

    estimate.__name__ = f"{method}_estimator"
    estimate.__doc__ = f"`group_advantages` with method {method!r}, broadcast to valid tokens."
    return estimate


register_advantage_estimator("grpo", _group_estimator("grpo"), label="GRPO", needs_values=False,
                             group=True)  # fmt: skip
# Dr.GRPO: no std and no length normalisation; the loss sums tokens over a fixed constant.
register_advantage_estimator(
    "dr_grpo", _group_estimator("dr_grpo"), label="Dr.GRPO", needs_values=False, group=True,
    aggregation="seq_mean_token_sum_norm", norm_constant="max_new_tokens",
)  # fmt: skip
register_advantage_estimator("rloo", _group_estimator("rloo"), label="RLOO", needs_values=False,
                             group=True)  # fmt: skip
