"""Masked reductions and loss aggregation over a ``[batch, time]`` token grid.

Aggregation modes (``aggregation=`` on every loss, registered in `LOSS_AGGREGATIONS`):

- ``token_mean``: sum over valid tokens / number of valid tokens.
- ``seq_mean_token_mean``: per-sequence token mean, then mean over sequences.
- ``seq_mean_token_sum``: per-sequence token sum, then mean over sequences.
- ``seq_mean_token_sum_norm`` (Dr.GRPO): per-sequence token sum / ``norm_constant``, then mean
  over sequences. The config passes ``generation.max_new_tokens`` (see
  `effective_loss_aggregation`), so every micro-batch uses the same constant; called without
  one, the padded length T of this grid is used.

"Sequences" are rows with at least one valid token, so all-padding filler rows change nothing.
Every normaliser is clamped to >= 1: an all-masked batch has loss 0 and zero (finite) gradients.

Gradient accumulation: pass ``denominators=loss_denominators(mask_of_the_whole_batch)`` to the
loss of each micro-batch. Each micro-batch then returns (its share of the numerator) / (global
normaliser), so the sum of micro-batch losses equals the loss of the whole batch exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.algorithms._checks import check_same_shape, is_number
from jaxrlhf.algorithms.registries import LOSS_AGGREGATIONS


class Denominators(NamedTuple):
    """Normalisers of the whole (global) batch; a pytree, so it can enter a jitted step."""

    tokens: jax.Array  # valid tokens
    seqs: jax.Array  # sequences with at least one valid token


def loss_denominators(mask_bt: jax.Array) -> Denominators:
    """Token and sequence counts of ``mask_bt``; compute once on the full batch."""
    valid_bt = jnp.asarray(mask_bt) > 0
    return Denominators(
        tokens=jnp.sum(valid_bt, dtype=jnp.float32),
        seqs=jnp.sum(jnp.any(valid_bt, axis=-1), dtype=jnp.float32),
    )


def masked_sum(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Sum of ``x`` where ``mask`` is set; values under the mask may be anything, even NaN."""
    return jnp.sum(jnp.where(mask > 0, x, 0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Mean over valid entries; 0 where there are none."""
    count = jnp.sum(mask > 0, axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def masked_var(x: jax.Array, mask: jax.Array, ddof: int = 0) -> jax.Array:
    """Variance over all valid entries; 0 where there are too few."""
    valid = mask > 0
    n = jnp.sum(valid)
    mean = masked_mean(x, mask)
    sq = masked_sum(jnp.square(x - mean), mask)
    return jnp.where(n > ddof, sq / jnp.maximum(n - ddof, 1), 0.0)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Max over valid entries; 0 where there are none."""
    valid = mask > 0
    return jnp.where(jnp.any(valid), jnp.max(jnp.where(valid, x, -jnp.inf)), 0.0).astype(x.dtype)


def masked_min(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Min over valid entries; 0 where there are none."""
    valid = mask > 0
    return jnp.where(jnp.any(valid), jnp.min(jnp.where(valid, x, jnp.inf)), 0.0).astype(x.dtype)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-6) -> jax.Array:
    """(x - mean) / (std + eps) over all valid entries (population std); 0 on padding."""
    mean = masked_mean(x, mask)
    std = jnp.sqrt(masked_var(x, mask))
    return jnp.where(mask > 0, (x - mean) / (std + eps), 0.0)


@LOSS_AGGREGATIONS.register(
    "token_mean", sequence_level=False, uses_norm_constant=False,
    help="sum over valid tokens / valid tokens",
)  # fmt: skip
def _token_mean(x_bt, valid_bt, den: Denominators, norm_constant):
    return jnp.sum(x_bt) / jnp.maximum(den.tokens, 1.0)


@LOSS_AGGREGATIONS.register(
    "seq_mean_token_mean", sequence_level=True, uses_norm_constant=False,
    help="per-sequence token mean, then the mean over sequences",
)  # fmt: skip
def _seq_mean_token_mean(x_bt, valid_bt, den: Denominators, norm_constant):
    per_seq_b = jnp.sum(x_bt, -1) / jnp.maximum(jnp.sum(valid_bt, -1), 1)
    return jnp.sum(per_seq_b) / jnp.maximum(den.seqs, 1.0)


@LOSS_AGGREGATIONS.register(
    "seq_mean_token_sum", sequence_level=True, uses_norm_constant=False,
    help="per-sequence token sum, then the mean over sequences",
)  # fmt: skip
def _seq_mean_token_sum(x_bt, valid_bt, den: Denominators, norm_constant):
    return jnp.sum(x_bt) / jnp.maximum(den.seqs, 1.0)


@LOSS_AGGREGATIONS.register(
    "seq_mean_token_sum_norm", sequence_level=True, uses_norm_constant=True,
    help="per-sequence token sum / a constant (the max response length), mean over sequences",
)  # fmt: skip
def _seq_mean_token_sum_norm(x_bt, valid_bt, den: Denominators, norm_constant):
    constant = x_bt.shape[-1] if norm_constant is None else norm_constant
    return jnp.sum(x_bt) / (jnp.maximum(den.seqs, 1.0) * constant)


def aggregate(
    values_bt: jax.Array,
    mask_bt: jax.Array,
    mode: str = "token_mean",
    *,
    denominators: Denominators | None = None,
    norm_constant: float | None = None,
) -> jax.Array:
    """Reduce per-token ``values_bt`` to a scalar loss (see the module docstring for modes).

    ``denominators`` default to this batch's own counts; pass the full batch's counts when this
    is one micro-batch of several.
    """
    check_same_shape("aggregate", 2, values_bt=values_bt, mask_bt=mask_bt)
    if norm_constant is not None and is_number(norm_constant) and norm_constant <= 0:
        raise ValueError(f"aggregate: norm_constant must be > 0, got {norm_constant}.")
    fn = LOSS_AGGREGATIONS.get(mode)
    valid_bt = mask_bt > 0
    x_bt = jnp.where(valid_bt, values_bt, 0)
    den = loss_denominators(mask_bt) if denominators is None else denominators
    return fn(x_bt, valid_bt, den, norm_constant)
