"""Token entropy of the policy and the entropy bonus term."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.algorithms._checks import check_same_shape
from jaxrlhf.algorithms.aggregation import Denominators, aggregate, masked_mean


def entropy_from_logits(logits_btv: jax.Array, mask_bt: jax.Array | None = None) -> jax.Array:
    """H = −Σ_v p_v log p_v per token, in float32 or wider; 0 on padding when ``mask_bt`` given.

    Vocabulary entries at −inf (masked-out tokens) contribute 0, not NaN.
    """
    if mask_bt is not None and jnp.shape(mask_bt) != jnp.shape(logits_btv)[:-1]:
        raise ValueError(
            f"entropy_from_logits: mask_bt {jnp.shape(mask_bt)} does not match the leading axes "
            f"of logits_btv {jnp.shape(logits_btv)}."
        )
    logits = logits_btv.astype(jnp.result_type(jnp.float32, logits_btv.dtype))
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    # 0·log 0 = 0; zero log p there first so the gradient is not 0·(−inf) = NaN either.
    safe_logp = jnp.where(p > 0, logp, 0.0)
    entropy = -jnp.sum(p * safe_logp, axis=-1)
    if mask_bt is not None:
        entropy = jnp.where(mask_bt > 0, entropy, 0.0)
    return entropy


def entropy_bonus(
    entropy_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    coef: float,
    aggregation: str = "token_mean",
    denominators: Denominators | None = None,
    norm_constant: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss term −coef · aggregated entropy (add it to the actor loss); metrics: ``entropy``."""
    check_same_shape("entropy_bonus", 2, entropy_bt=entropy_bt, mask_bt=mask_bt)
    agg = aggregate(
        entropy_bt, mask_bt, aggregation, denominators=denominators, norm_constant=norm_constant
    )
    return -coef * agg, {"entropy": jax.lax.stop_gradient(masked_mean(entropy_bt, mask_bt))}
