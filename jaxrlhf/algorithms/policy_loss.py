"""Actor losses: clipped PPO (clip-higher, dual clip, decoupled async objective) and GSPO.

Both are registered in `POLICY_LOSSES` with one signature, so ``algorithm.policy_loss`` swaps
them. Inputs are ``[batch, time]`` token grids; values under ``mask_bt == 0`` are ignored (they
may be garbage, even inf/NaN, without reaching the loss or its gradient).

Log-ratios are clamped to ±`LOG_RATIO_BOUND` (20, as verl does) before ``exp``: beyond about
88 float32 ``exp`` overflows and the backward pass gives NaN. A ratio of e^20 ≈ 5e8 is far past
any clip range, so the clamp changes nothing a clipped objective would use; past the bound the
token's ratio is constant (no gradient through it).

Decoupled PPO (asynchronous RL): the ratio is taken against the *proximal* policy π_prox
(log-probs recomputed just before the update) and each token is weighted by
w = π_prox / π_behaviour (the policy that generated it), with no gradient through w. Pass
``behaviour_logp_bt=None`` (or the proximal log-probs) for ordinary PPO: then w = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.algorithms._checks import check_same_shape, compute_dtype, is_number
from jaxrlhf.algorithms.aggregation import (
    Denominators,
    aggregate,
    masked_max,
    masked_mean,
    masked_min,
)
from jaxrlhf.algorithms.kl import clamp_log_ratio, k3
from jaxrlhf.algorithms.registries import register_policy_loss

BEHAVIOUR_WEIGHT_MODES = ("truncate", "mask")


def _check_hparams(
    fn: str,
    eps_clip: float,
    eps_clip_high: float | None,
    dual_clip: float | None,
    behaviour_weight_cap: float | None,
    behaviour_weight_mode: str,
) -> None:
    if is_number(eps_clip) and not 0 < eps_clip < 1:
        raise ValueError(f"{fn}: eps_clip must be in (0, 1), got {eps_clip}.")
    if eps_clip_high is not None and is_number(eps_clip_high) and eps_clip_high <= 0:
        raise ValueError(f"{fn}: eps_clip_high must be > 0, got {eps_clip_high}.")
    if dual_clip is not None and is_number(dual_clip) and dual_clip <= 1:
        raise ValueError(f"{fn}: dual_clip must be > 1, got {dual_clip}.")
    cap = behaviour_weight_cap
    if cap is not None and is_number(cap) and cap <= 0:
        raise ValueError(f"{fn}: behaviour_weight_cap must be > 0, got {cap}.")
    if behaviour_weight_mode not in BEHAVIOUR_WEIGHT_MODES:
        raise ValueError(
            f"{fn}: behaviour_weight_mode must be one of {BEHAVIOUR_WEIGHT_MODES}, "
            f"got {behaviour_weight_mode!r}."
        )


def behaviour_weights(
    proximal_logp_bt: jax.Array,
    behaviour_logp_bt: jax.Array | None,
    mask_bt: jax.Array,
    cap: float | None = None,
    mode: str = "truncate",
) -> tuple[jax.Array, jax.Array]:
    """Decoupled-PPO token weights w = exp(logπprox − logπbehav), without gradient.

    Above ``cap`` a weight is truncated to ``cap`` (``mode="truncate"``) or the token dropped
    (``mode="mask"``, weight 0). Returns (weights_bt, over_cap_bt); weights are 1 when
    ``behaviour_logp_bt`` is None and 0 on padding.
    """
    valid = mask_bt > 0
    dtype = compute_dtype(proximal_logp_bt, behaviour_logp_bt)
    if behaviour_logp_bt is None:
        ones = jnp.where(valid, 1.0, 0.0).astype(dtype)
        return ones, jnp.zeros(mask_bt.shape, bool)
    log_w = jnp.where(valid, proximal_logp_bt.astype(dtype) - behaviour_logp_bt.astype(dtype), 0.0)
    log_w = clamp_log_ratio(jax.lax.stop_gradient(log_w))
    if cap is None:
        return jnp.where(valid, jnp.exp(log_w), 0.0), jnp.zeros(mask_bt.shape, bool)
    log_cap = jnp.log(jnp.asarray(cap, dtype))
    over = valid & (log_w > log_cap)
    # exp(min(.)) rather than min(exp(.)) so a huge log-weight cannot overflow to inf.
    w = jnp.exp(jnp.minimum(log_w, log_cap))
    if mode == "mask":
        w = jnp.where(over, 0.0, w)
    return jnp.where(valid, w, 0.0), over


def _clipped_surrogate(ratio_bt, adv_bt, eps_low, eps_high, dual_clip):
    """Token loss max(−A·r, −A·clip(r)) (optionally dual-clipped) and which branch won."""
    surr = -adv_bt * ratio_bt
    surr_clipped = -adv_bt * jnp.clip(ratio_bt, 1.0 - eps_low, 1.0 + eps_high)
    loss_bt = jnp.maximum(surr, surr_clipped)
    clipped_low = (adv_bt < 0) & (ratio_bt < 1.0 - eps_low)
    clipped_high = (adv_bt > 0) & (ratio_bt > 1.0 + eps_high)
    if dual_clip is None:
        dual = jnp.zeros(ratio_bt.shape, bool)
    else:
        # For A < 0 an unbounded ratio gives an unbounded loss; cap it at c·|A| (c > 1).
        bound = -adv_bt * dual_clip
        dual = (adv_bt < 0) & (loss_bt > bound)
        loss_bt = jnp.where(dual, bound, loss_bt)
    return loss_bt, clipped_low, clipped_high, dual


def _surrogate_loss(
    ratio_bt,
    token_log_ratio_bt,
    prox_bt,
    behav_bt,
    adv_bt,
    mask_bt,
    *,
    eps_clip,
    eps_clip_high,
    dual_clip,
    behaviour_weight_cap,
    behaviour_weight_mode,
    aggregation,
    denominators,
    norm_constant,
):
    valid = mask_bt > 0
    adv_bt = jnp.where(valid, adv_bt.astype(ratio_bt.dtype), 0.0)
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high
    pg_bt, low, high, dual = _clipped_surrogate(ratio_bt, adv_bt, eps_clip, eps_high, dual_clip)
    w_bt, over_cap = behaviour_weights(
        prox_bt, behav_bt, mask_bt, behaviour_weight_cap, behaviour_weight_mode
    )
    loss = aggregate(
        w_bt * pg_bt, mask_bt, aggregation, denominators=denominators, norm_constant=norm_constant
    )
    sg = jax.lax.stop_gradient
    ratio_sg = sg(ratio_bt)
    metrics = {
        "loss": sg(loss),
        "clip_frac_low": masked_mean(low, mask_bt),
        "clip_frac_high": masked_mean(high, mask_bt),
        "clip_frac": masked_mean(low | high, mask_bt),
        "dual_clip_frac": masked_mean(dual, mask_bt),
        # k3 estimate of KL(π_prox ‖ π_θ) on the sampled tokens: (r − 1) − log r >= 0.
        "approx_kl": masked_mean(k3(-sg(token_log_ratio_bt)), mask_bt),
        "ratio_mean": masked_mean(ratio_sg, mask_bt),
        "ratio_max": masked_max(ratio_sg, mask_bt),
        "ratio_min": masked_min(ratio_sg, mask_bt),
        "importance_weight_mean": masked_mean(w_bt, mask_bt),
        "importance_weight_max": masked_max(w_bt, mask_bt),
        "importance_weight_min": masked_min(w_bt, mask_bt),
        "importance_weight_over_cap_frac": masked_mean(over_cap, mask_bt),
        "tokens": jnp.sum(valid, dtype=jnp.float32),
    }
    return loss, metrics


@register_policy_loss("ppo")
def ppo_actor_loss(
    logp_bt: jax.Array,
    proximal_logp_bt: jax.Array,
    behaviour_logp_bt: jax.Array | None,
    advantages_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    eps_clip: float,
    eps_clip_high: float | None = None,
    dual_clip: float | None = None,
    behaviour_weight_cap: float | None = None,
    behaviour_weight_mode: str = "truncate",
    aggregation: str = "token_mean",
    denominators: Denominators | None = None,
    norm_constant: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped PPO surrogate with r = exp(logπθ − logπprox); returns (loss, metrics).

    ``eps_clip_high`` (DAPO clip-higher) defaults to ``eps_clip``; ``dual_clip`` = c > 1 bounds
    the token loss by c·|A| where A < 0; ``behaviour_weight_cap`` caps the decoupled weights.
    Metrics are masked token means over this batch (plus ``tokens``, its valid-token count):
    ``clip_frac_low`` / ``clip_frac_high`` (A < 0 with r < 1 − ε_low / A > 0 with r > 1 + ε_high:
    the clip removed the gradient), ``dual_clip_frac``, ``approx_kl`` (k3 estimate of
    KL(π_prox ‖ πθ)), ``ratio_*`` and ``importance_weight_*`` (mean / max / min of the applied
    weights, and the fraction over the cap).
    """
    fn = "ppo_actor_loss"
    check_same_shape(
        fn,
        2,
        logp_bt=logp_bt,
        proximal_logp_bt=proximal_logp_bt,
        behaviour_logp_bt=behaviour_logp_bt,
        advantages_bt=advantages_bt,
        mask_bt=mask_bt,
    )
    _check_hparams(
        fn, eps_clip, eps_clip_high, dual_clip, behaviour_weight_cap, behaviour_weight_mode
    )
    dtype = compute_dtype(logp_bt, proximal_logp_bt)
    log_ratio = logp_bt.astype(dtype) - jax.lax.stop_gradient(proximal_logp_bt.astype(dtype))
    log_ratio = clamp_log_ratio(jnp.where(mask_bt > 0, log_ratio, 0.0))
    ratio_bt = jnp.exp(log_ratio)
    return _surrogate_loss(
        ratio_bt,
        log_ratio,
        proximal_logp_bt,
        behaviour_logp_bt,
        advantages_bt,
        mask_bt,
        eps_clip=eps_clip,
        eps_clip_high=eps_clip_high,
        dual_clip=dual_clip,
        behaviour_weight_cap=behaviour_weight_cap,
        behaviour_weight_mode=behaviour_weight_mode,
        aggregation=aggregation,
        denominators=denominators,
        norm_constant=norm_constant,
    )


# GSPO's ratio is per sequence: only a sequence-level aggregation keeps its objective (verl's
# GSPO uses seq-mean-token-mean).
@register_policy_loss(
    "gspo", aggregation="seq_mean_token_mean", aggregations=("seq_mean_token_mean",)
)
def gspo_actor_loss(
    logp_bt: jax.Array,
    proximal_logp_bt: jax.Array,
    behaviour_logp_bt: jax.Array | None,
    advantages_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    eps_clip: float,
    eps_clip_high: float | None = None,
    dual_clip: float | None = None,
    behaviour_weight_cap: float | None = None,
    behaviour_weight_mode: str = "truncate",
    aggregation: str = "seq_mean_token_mean",
    denominators: Denominators | None = None,
    norm_constant: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GSPO: the PPO surrogate with a sequence-level, length-normalised ratio.

    s_i = exp(mean_t(logπθ − logπprox)) over sequence i's valid tokens. Implemented in the
    token form s_{i,t} = sg(s_i) · πθ(y_t) / sg(πθ(y_t)): its value is s_i on every token, and
    with per-sequence advantages and ``seq_mean_token_mean`` (the default) the loss and gradient
    are exactly GSPO's; per-token advantages are also accepted. GSPO's clip ranges are small
    (e.g. ``eps_clip=3e-4, eps_clip_high=4e-4``). Other arguments as `ppo_actor_loss`.
    """
    fn = "gspo_actor_loss"
    check_same_shape(
        fn,
        2,
        logp_bt=logp_bt,
        proximal_logp_bt=proximal_logp_bt,
        behaviour_logp_bt=behaviour_logp_bt,
        advantages_bt=advantages_bt,
        mask_bt=mask_bt,
    )
    _check_hparams(
        fn, eps_clip, eps_clip_high, dual_clip, behaviour_weight_cap, behaviour_weight_mode
    )
    valid = mask_bt > 0
    dtype = compute_dtype(logp_bt, proximal_logp_bt)
    logp = jnp.where(valid, logp_bt.astype(dtype), 0.0)
    log_ratio = jnp.where(valid, logp - jax.lax.stop_gradient(proximal_logp_bt.astype(dtype)), 0.0)
    seq_log_ratio_b = jnp.sum(log_ratio, -1) / jnp.maximum(jnp.sum(valid, -1), 1)
    sg = jax.lax.stop_gradient
    # The clamp applies to the sequence ratio; the token term's value is 0 (its gradient only).
    token_log_ratio = sg(clamp_log_ratio(seq_log_ratio_b))[:, None] + (logp - sg(logp))
    ratio_bt = jnp.exp(jnp.where(valid, token_log_ratio, 0.0))
    return _surrogate_loss(
        ratio_bt,
        clamp_log_ratio(log_ratio),
        proximal_logp_bt,
        behaviour_logp_bt,
        advantages_bt,
        mask_bt,
        eps_clip=eps_clip,
        eps_clip_high=eps_clip_high,
        dual_clip=dual_clip,
        behaviour_weight_cap=behaviour_weight_cap,
        behaviour_weight_mode=behaviour_weight_mode,
        aggregation=aggregation,
        denominators=denominators,
        norm_constant=norm_constant,
    )
