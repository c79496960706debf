"""KL estimators between a policy and a reference, per token, and their two uses.

With log ρ = log π − log π_ref evaluated on tokens sampled from π (Schulman's estimators):
``k1`` = log ρ (unbiased, high variance, can be negative), ``k2`` = ½ (log ρ)² (its gradient is
the unbiased gradient of KL), ``k3`` = e^{−log ρ} − 1 + log ρ (unbiased, >= 0, low variance).

Every ``exp`` of a log-ratio here and in the policy losses first clamps it to ±`LOG_RATIO_BOUND`
(20, as verl does): float32 ``exp`` overflows past about 88 and its gradient becomes NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.algorithms._checks import check_same_shape, compute_dtype
from jaxrlhf.algorithms.aggregation import Denominators, aggregate, masked_mean
from jaxrlhf.algorithms.registries import KL_ESTIMATORS

LOG_RATIO_BOUND = 20.0  # |log r| cap before exp (float32 exp overflows past ~88)


def clamp_log_ratio(log_ratio: jax.Array) -> jax.Array:
    """``log_ratio`` clipped to ±`LOG_RATIO_BOUND` (apply before ``exp``)."""
    return jnp.clip(log_ratio, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)


@KL_ESTIMATORS.register("k1", help="log ρ: unbiased, high variance, can be negative")
def k1(log_ratio: jax.Array) -> jax.Array:
    """log ρ."""
    return log_ratio


@KL_ESTIMATORS.register("k2", help="½ (log ρ)²: its gradient is the unbiased gradient of the KL")
def k2(log_ratio: jax.Array) -> jax.Array:
    """½ (log ρ)²."""
    return 0.5 * jnp.square(log_ratio)


@KL_ESTIMATORS.register("k3", help="e^{−log ρ} − 1 + log ρ: unbiased, >= 0, low variance")
def k3(log_ratio: jax.Array) -> jax.Array:
    """e^{−log ρ} − 1 + log ρ (expm1 keeps it exact near ρ = 1), log ρ clamped first."""
    log_ratio = clamp_log_ratio(log_ratio)
    return jnp.expm1(-log_ratio) + log_ratio


def kl(
    logp: jax.Array,
    ref_logp: jax.Array,
    estimator: str = "k3",
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Per-token KL(π ‖ π_ref) estimate; with ``mask``, 0 (and no NaN gradient) on padding."""
    check_same_shape("kl", None, logp=logp, ref_logp=ref_logp, mask=mask)
    fn = KL_ESTIMATORS.get(estimator)
    dtype = compute_dtype(logp, ref_logp)
    log_ratio = logp.astype(dtype) - ref_logp.astype(dtype)
    if mask is not None:
        log_ratio = jnp.where(mask > 0, log_ratio, 0.0)
    return fn(log_ratio)


def kl_reward_penalty(
    logp_bt: jax.Array,
    ref_logp_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    coef: float,
    estimator: str = "k1",
) -> jax.Array:
    """−coef · KL per token, to add to token rewards (PPO / REINFORCE++); no gradient flows."""
    check_same_shape(
        "kl_reward_penalty", 2, logp_bt=logp_bt, ref_logp_bt=ref_logp_bt, mask_bt=mask_bt
    )
    return jax.lax.stop_gradient(-coef * kl(logp_bt, ref_logp_bt, estimator, mask=mask_bt))


def kl_loss(
    logp_bt: jax.Array,
    ref_logp_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    coef: float = 1.0,
    estimator: str = "k3",
    aggregation: str = "token_mean",
    denominators: Denominators | None = None,
    norm_constant: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """coef · aggregated KL, a loss term (GRPO style); metrics: masked-mean ``kl``."""
    check_same_shape("kl_loss", 2, logp_bt=logp_bt, ref_logp_bt=ref_logp_bt, mask_bt=mask_bt)
    kl_bt = kl(logp_bt, ref_logp_bt, estimator, mask=mask_bt)
    loss = coef * aggregate(
        kl_bt, mask_bt, aggregation, denominators=denominators, norm_constant=norm_constant
    )
    return loss, {"kl": jax.lax.stop_gradient(masked_mean(kl_bt, mask_bt))}
