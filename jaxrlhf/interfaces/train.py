"""The generic train step: gradient accumulation over micro-batches in one `lax.scan`, then one
clipped AdamW update. Actor and critic steps plug in a per-micro-batch loss.

Exactness: every micro-batch loss is normalised by the *whole* batch's `Denominators`, so the
micro-batch losses and gradients add up to those of the full batch; 1 micro-batch of 8
sequences and 8 micro-batches of 1 give the same update up to float rounding.

All-masked input: a micro-batch without loss tokens adds exactly 0 to the loss and gradient,
so it is skipped: filler micro-batches from bucketing have no effect and cost no compute. A
whole batch without loss tokens has loss 0 and leaves the state untouched: no update, no weight
decay, no change to the moments or the step count (``update_skipped`` = 1).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.algorithms import Denominators, loss_denominators
from jaxrlhf.interfaces.microbatch import Batch, loss_mask
from jaxrlhf.interfaces.state import TrainState
from jaxrlhf.models.transformer import Params

MicroBatchLoss = Callable[[Params, Batch, Denominators], tuple[jax.Array, dict[str, jax.Array]]]

# Metrics that add up over micro-batches; "*_max" / "*_min" reduce by max / min over the
# micro-batches that have tokens; everything else is a token-weighted mean.
SUM_METRICS = ("loss", "pg_loss", "kl_loss", "entropy_loss", "value_loss", "tokens", "seqs")


def batch_denominators(batch: Batch) -> Denominators:
    """Token and sequence counts of the whole stacked batch's loss mask."""
    mask_mst = jax.vmap(loss_mask)(batch)
    return loss_denominators(mask_mst.reshape(-1, mask_mst.shape[-1]))


def accumulate_gradients(
    mb_loss: MicroBatchLoss,
    params: Params,
    batch: Batch,
    den: Denominators,
    grad_shardings: object | None = None,
) -> tuple[Params, dict[str, jax.Array]]:
    """Sum of micro-batch gradients (float32, sharded like the params) and the per-micro-batch
    metrics stacked on a leading ``[M]`` axis.

    A micro-batch without loss tokens contributes exactly zero, so it is skipped (`lax.cond`):
    filler micro-batches from bucketing cost no compute.
    """
    grad_fn = jax.value_and_grad(lambda p, mb: mb_loss(p, mb, den), has_aux=True)

    def compute(mb: Batch) -> tuple[Params, dict[str, jax.Array]]:
        (_, metrics), grads = grad_fn(params, mb)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), metrics

    def body(acc: Params, mb: Batch) -> tuple[Params, dict[str, jax.Array]]:
        shapes = jax.eval_shape(compute, mb)
        skip = lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        grads, metrics = jax.lax.cond(jnp.any(loss_mask(mb) > 0), compute, skip, mb)
        acc = jax.tree.map(jnp.add, acc, grads)
        if grad_shardings is not None:  # keep the accumulator in the params' (fsdp) shards
            acc = jax.lax.with_sharding_constraint(acc, grad_shardings)
        return acc, metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if grad_shardings is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
    return jax.lax.scan(body, zeros, batch)


def combine_metrics(metrics_m: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Reduce ``[M]`` micro-batch metrics to batch metrics (see `SUM_METRICS`)."""
    tokens = metrics_m["tokens"]
    has = tokens > 0
    total = jnp.maximum(jnp.sum(tokens), 1.0)
    out = {}
    for key, value in metrics_m.items():
        value = value.astype(jnp.float32)
        if key in SUM_METRICS or key.startswith("sum_"):
            out[key] = jnp.sum(value)
        elif key.endswith("_max"):
            out[key] = jnp.where(jnp.any(has), jnp.max(jnp.where(has, value, -jnp.inf)), 0.0)
        elif key.endswith("_min"):
            out[key] = jnp.where(jnp.any(has), jnp.min(jnp.where(has, value, jnp.inf)), 0.0)
        else:
            out[key] = jnp.sum(value * tokens) / total
    return out


def global_norm(tree: Params) -> jax.Array:
    """sqrt of the sum of squares of every leaf (float32)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def apply_gradients(
    state: TrainState,
    grads: Params,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    skip: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; ``skip`` leaves the state as it is. The float32 gradients drive
    the update; params and optimizer moments keep their dtypes (e.g. bfloat16)."""

    def update(s: TrainState) -> TrainState:
        updates, opt_state = tx.update(grads, s.opt_state, s.params)
        opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, s.opt_state)
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), s.params, updates)
        return TrainState(params=params, opt_state=opt_state, step=s.step + 1)

    metrics = {
        "grad_norm": global_norm(grads),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "update_skipped": skip.astype(jnp.float32),
    }
    return jax.lax.cond(skip, lambda s: s, update, state), metrics


def train_step(
    mb_loss: MicroBatchLoss,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state: TrainState,
    batch: Batch,
    grad_shardings: object | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Accumulate over the micro-batches of ``batch`` (stacked ``[M, ...]``), then update.

    Returns the new state and scalar metrics (device arrays; nothing is synced to the host).
    """
    den = batch_denominators(batch)
    grads, metrics_m = accumulate_gradients(mb_loss, state.params, batch, den, grad_shardings)
    metrics = combine_metrics(metrics_m)
    state, opt_metrics = apply_gradients(state, grads, tx, schedule, den.tokens == 0)
    return state, metrics | opt_metrics
