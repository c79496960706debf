"""Supervised objectives: the masked token NLL of SFT and the Bradley-Terry pairwise loss of
reward modelling, as pure functions over masked grids.

- `masked_nll`: L = −Σ_{b,t} m_bt · log p_bt / max(N, 1). With N = Σ m it is the mean NLL of
  the masked (response) tokens; with N the whole batch's count it is one micro-batch's share of
  that mean, so shares add up exactly. Unmasked tokens (prompt, padding) are multiplied by 0:
  they add nothing to the loss or its gradient.
- `bradley_terry`: L = Σ_p v_p · −log σ(r_c,p − r_r,p) / max(Σ_p v_p, 1), the mean over the
  valid pairs (v_p = 1) of the negative log-likelihood that the chosen response beats the
  rejected one; −log σ(d) = softplus(−d), stable for any |d|. The loss depends on score
  differences only, so it is invariant to a shared shift of the scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.algorithms._checks import check_same_shape


def masked_nll(logp_bt: jax.Array, mask_bt: jax.Array, tokens: jax.Array | float) -> jax.Array:
    """−Σ logp · mask / max(``tokens``, 1) over ``[B, T]`` token log-probs (module docstring)."""
    check_same_shape("masked_nll", 2, logp_bt=logp_bt, mask_bt=mask_bt)
    return -jnp.sum(logp_bt * mask_bt) / jnp.maximum(tokens, 1.0)


def bradley_terry(
    chosen_p: jax.Array, rejected_p: jax.Array, valid_p: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean −log σ(r_c − r_r) over the valid pairs of ``[P]`` scores; returns (loss, metrics).

    Metrics: ``loss``, ``accuracy`` (fraction with r_c > r_r; ties count as wrong), ``margin``
    (mean r_c − r_r), ``chosen_score``, ``rejected_score``, ``pairs`` (Σ valid).
    """
    check_same_shape("bradley_terry", 1, chosen_p=chosen_p, rejected_p=rejected_p, valid_p=valid_p)
    chosen_p = jnp.asarray(chosen_p, jnp.float32)
    rejected_p = jnp.asarray(rejected_p, jnp.float32)
    valid = jnp.ones_like(chosen_p) if valid_p is None else jnp.asarray(valid_p, jnp.float32)
    n = jnp.maximum(jnp.sum(valid), 1.0)
    diff = chosen_p - rejected_p
    mean = lambda x: jnp.sum(x * valid) / n
    loss = mean(jax.nn.softplus(-diff))
    metrics = {
        "loss": loss,
        "accuracy": mean((diff > 0).astype(jnp.float32)),
        "margin": mean(diff),
        "chosen_score": mean(chosen_p),
        "rejected_score": mean(rejected_p),
        "pairs": jnp.sum(valid),
    }
    return loss, metrics
