"""Critic (value) loss with PPO-style value clipping, MSE or Huber."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.algorithms._checks import check_same_shape, compute_dtype, is_number
from jaxrlhf.algorithms.aggregation import (
    Denominators,
    aggregate,
    masked_mean,
    masked_var,
)

VALUE_LOSS_TYPES = ("mse", "huber")


def _elementwise(err: jax.Array, loss_type: str, delta: float) -> jax.Array:
    if loss_type == "mse":
        return 0.5 * jnp.square(err)
    abs_err = jnp.abs(err)
    return jnp.where(abs_err <= delta, 0.5 * jnp.square(err), delta * (abs_err - 0.5 * delta))


def critic_loss(
    values_bt: jax.Array,
    old_values_bt: jax.Array | None,
    returns_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    value_clip: float | None = None,
    loss_type: str = "mse",
    huber_delta: float = 1.0,
    aggregation: str = "token_mean",
    denominators: Denominators | None = None,
    norm_constant: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Value loss; returns (loss, metrics).

    Per token: ℓ(V − R) with ℓ = ½x² (``mse``) or Huber(δ) (``huber``). With ``value_clip`` = c,
    V_clip = V_old + clip(V − V_old, −c, c) and the token loss is max(ℓ(V − R), ℓ(V_clip − R)).
    Metrics: ``clip_frac`` (tokens where the clipped branch is larger), ``explained_variance``
    (1 − Var[R − V] / Var[R]; 0 when Var[R] = 0), ``value_mean``, ``return_mean``, ``tokens``.
    """
    fn = "critic_loss"
    check_same_shape(
        fn,
        2,
        values_bt=values_bt,
        old_values_bt=old_values_bt,
        returns_bt=returns_bt,
        mask_bt=mask_bt,
    )
    if loss_type not in VALUE_LOSS_TYPES:
        raise ValueError(f"{fn}: loss_type must be one of {VALUE_LOSS_TYPES}, got {loss_type!r}.")
    if value_clip is not None and old_values_bt is None:
        raise ValueError(f"{fn}: value_clip={value_clip} needs old_values_bt, got None.")
    if value_clip is not None and is_number(value_clip) and value_clip <= 0:
        raise ValueError(f"{fn}: value_clip must be > 0, got {value_clip}.")
    valid = mask_bt > 0
    dtype = compute_dtype(values_bt, returns_bt)
    v = jnp.where(valid, values_bt.astype(dtype), 0.0)
    ret = jax.lax.stop_gradient(jnp.where(valid, returns_bt.astype(dtype), 0.0))
    loss_bt = _elementwise(v - ret, loss_type, huber_delta)
    clipped = jnp.zeros(v.shape, bool)
    if value_clip is not None:
        old = jax.lax.stop_gradient(jnp.where(valid, old_values_bt.astype(dtype), 0.0))
        v_clip = old + jnp.clip(v - old, -value_clip, value_clip)
        loss_clip_bt = _elementwise(v_clip - ret, loss_type, huber_delta)
        clipped = valid & (loss_clip_bt > loss_bt)
        loss_bt = jnp.maximum(loss_bt, loss_clip_bt)
    loss = aggregate(
        loss_bt, mask_bt, aggregation, denominators=denominators, norm_constant=norm_constant
    )
    v_sg = jax.lax.stop_gradient(v)
    var_ret = masked_var(ret, mask_bt)
    var_res = masked_var(ret - v_sg, mask_bt)
    explained = jnp.where(var_ret > 0, 1.0 - var_res / jnp.where(var_ret > 0, var_ret, 1.0), 0.0)
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "clip_frac": masked_mean(clipped, mask_bt),
        "explained_variance": explained,
        "value_mean": masked_mean(v_sg, mask_bt),
        "return_mean": masked_mean(ret, mask_bt),
        "tokens": jnp.sum(valid, dtype=jnp.float32),
    }
    return loss, metrics
