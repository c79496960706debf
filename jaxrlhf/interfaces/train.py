"""The one train step: gradient accumulation over micro-batches in one `lax.scan`, then one
clipped AdamW update. Actor, critic, SFT and reward-model training differ only in the
micro-batch loss and the frozen `LossSpec` they plug in; `compile_train_step` jits the step
(explicit shardings, state donated, cached per shape) and `run_train_step` is the host entry.

A micro-batch loss is ``mb_loss(params, mb, den, *, cfg, spec, mesh) -> (loss, metrics)``: ``mb``
is one micro-batch (the stacked batch without its ``[M]`` axis), ``den`` the *whole* batch's
`Denominators`, and the metrics include ``tokens``, the micro-batch's loss tokens.

Exactness: every micro-batch loss is normalised by the whole batch's `Denominators`, so the
micro-batch losses and gradients add up to those of the full batch; 1 micro-batch of 8
sequences and 8 micro-batches of 1 give the same update up to float rounding.

All-masked input: a micro-batch without loss tokens adds exactly 0 to the loss and gradient,
so it is skipped: filler micro-batches from bucketing have no effect and cost no compute. A
whole batch without loss tokens has loss 0 and leaves the state untouched: no update, no weight
decay, no change to the moments or the step count (``update_skipped`` = 1).

Non-finite steps: when a loss metric (`LOSS_METRICS`) or the gradient's global norm is NaN or
inf, the update is skipped the same way (the state is bit-equal to the one given) and the step
reports ``nonfinite_skipped`` = 1 and ``update_skipped`` = 1; its other metrics keep their
non-finite values, so the caller can name the bad one (the run loop stops after
``algorithm.max_bad_steps`` such steps in a row).

Caching: the compiled step is keyed on (loss, spec, model config, optimizer, schedule horizon,
mesh, parameter layout, batch shapes); all are hashable, so equal shapes compile once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from numpy.typing import ArrayLike

from jaxrlhf.algorithms import Denominators, loss_denominators
from jaxrlhf.hostio import put
from jaxrlhf.interfaces.microbatch import (
    Batch,
    Shapes,
    batch_shardings,
    check_batch,
    loss_mask,
    put_batch,
    replicated,
    shapes_of,
)
from jaxrlhf.interfaces.packing import PackedBatch
from jaxrlhf.interfaces.state import ParamLayout, TrainState, state_shardings
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params
from jaxrlhf.optim import OptimizerSpec, lr_schedule, make_optimizer

Metrics = dict[str, jax.Array]
# (params, mb, den) -> (loss, metrics), with cfg / spec / mesh bound by keyword (module docstring).
MicroBatchLoss = Callable[..., tuple[jax.Array, Metrics]]

# The losses a step may report; one that is not finite skips the update (module docstring).
LOSS_METRICS = ("loss", "pg_loss", "kl_loss", "entropy_loss", "value_loss")
# Metrics that add up over micro-batches; "*_max" / "*_min" reduce by max / min over the
# micro-batches that have tokens; everything else is a token-weighted mean.
SUM_METRICS = (*LOSS_METRICS, "tokens", "seqs")


class LossSpec:
    """Static settings of a micro-batch loss. Subclasses are frozen dataclasses (hashable:
    compiled steps are cached on them); the hooks below default to doing nothing."""

    name: ClassVar[str] = "train"  # names the step in error messages
    aux_keys: ClassVar[tuple[str, ...]] = ()  # whole-batch inputs besides the packed batch

    def required_fields(self) -> tuple[str, ...]:
        """The grid fields ``[M, S, T]`` the batch must carry."""
        return ("loss_mask",)

    def prepare(
        self, params: Params, batch: Batch, aux: Batch, *, cfg: TransformerConfig,
        mesh: Mesh | None,
    ) -> tuple[Batch, Metrics]:  # fmt: skip
        """Whole-batch work before accumulation: the batch with any fields the micro-batch loss
        reads added, and batch-level metrics."""
        del params, aux, cfg, mesh
        return batch, {}

    def finish(self, metrics: Metrics) -> Metrics:
        """The step's metrics from the combined micro-batch ones."""
        return metrics


def batch_denominators(batch: Batch) -> Denominators:
    """Token and sequence counts of the whole stacked batch's loss mask."""
    mask_mst = jax.vmap(loss_mask)(batch)
    return loss_denominators(mask_mst.reshape(-1, mask_mst.shape[-1]))


def accumulate_gradients(
    mb_loss: Callable[[Params, Batch, Denominators], tuple[jax.Array, Metrics]],
    params: Params,
    batch: Batch,
    den: Denominators,
    grad_shardings: Any = None,
) -> tuple[Params, Metrics]:
    """Sum of micro-batch gradients (float32, sharded like the params) and the per-micro-batch
    metrics stacked on a leading ``[M]`` axis.

    A micro-batch without loss tokens contributes exactly zero, so it is skipped (`lax.cond`):
    filler micro-batches from bucketing cost no compute.
    """
    chex.assert_equal_shape_prefix(list(batch.values()), 1)  # one [M] axis to scan over
    grad_fn = jax.value_and_grad(lambda p, mb: mb_loss(p, mb, den), has_aux=True)

    def compute(mb: Batch) -> tuple[Params, Metrics]:
        (_, metrics), grads = grad_fn(params, mb)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), metrics

    def body(acc: Params, mb: Batch) -> tuple[Params, Metrics]:
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


def combine_metrics(metrics_m: Metrics) -> Metrics:
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


def losses_finite(metrics: Metrics) -> jax.Array:
    """True when every loss metric present (`LOSS_METRICS`) is finite."""
    return jnp.all(jnp.asarray([jnp.isfinite(metrics[k]) for k in LOSS_METRICS if k in metrics]))


def apply_gradients(
    state: TrainState,
    grads: Params,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    skip: jax.Array,
    finite: jax.Array | bool = True,
) -> tuple[TrainState, Metrics]:
    """One optimizer update. ``skip`` (no loss tokens), ``finite`` false (a non-finite loss) or a
    non-finite gradient norm leave the state exactly as it is. The float32 gradients drive the
    update; params and optimizer moments keep their dtypes (e.g. bfloat16)."""

    def update(s: TrainState) -> TrainState:
        updates, opt_state = tx.update(grads, s.opt_state, s.params)
        opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, s.opt_state)
        params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), s.params, updates)
        return TrainState(params=params, opt_state=opt_state, step=s.step + 1)

    grad_norm = global_norm(grads)
    nonfinite = jnp.logical_not(jnp.logical_and(finite, jnp.isfinite(grad_norm)))
    skip = jnp.logical_or(skip, nonfinite)
    metrics = {
        "grad_norm": grad_norm,
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "update_skipped": skip.astype(jnp.float32),
        "nonfinite_skipped": nonfinite.astype(jnp.float32),
    }
    return jax.lax.cond(skip, lambda s: s, update, state), metrics


def batch_gradients(
    mb_loss: MicroBatchLoss, params: Params, batch: Batch, aux: Batch | None = None, *,
    cfg: TransformerConfig, spec: LossSpec, mesh: Mesh | None = None,
    grad_shardings: Any = None,
) -> tuple[Params, Metrics]:  # fmt: skip
    """Gradient of the whole stacked batch's loss (float32, summed over micro-batches, sharded
    like the params when ``grad_shardings`` is given) and the batch's metrics."""
    batch, batch_metrics = spec.prepare(params, batch, aux or {}, cfg=cfg, mesh=mesh)
    loss = functools.partial(mb_loss, cfg=cfg, spec=spec, mesh=mesh)
    den = batch_denominators(batch)
    grads, metrics_m = accumulate_gradients(loss, params, batch, den, grad_shardings)
    chex.assert_trees_all_equal_shapes(grads, params)
    return grads, spec.finish(combine_metrics(metrics_m) | batch_metrics)


def train_step(
    mb_loss: MicroBatchLoss, state: TrainState, batch: Batch, aux: Batch | None = None, *,
    cfg: TransformerConfig, spec: LossSpec, opt: OptimizerSpec, total_steps: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, Metrics]:  # fmt: skip
    """Pure update on a stacked packed batch ``[M, ...]``: accumulate, then one optimizer step
    (skipped without loss tokens or with a non-finite loss or gradient). Jit it, or use
    `compile_train_step`. Returns the new state and scalar metrics (device arrays; nothing is
    synced to the host)."""
    check_batch(shapes_of(batch), spec.required_fields(), spec.name)
    tx = make_optimizer(opt, total_steps)
    layout = ParamLayout.of(state.params)
    grad_sh = None if mesh is None else state_shardings(cfg, layout, tx, mesh).params
    grads, metrics = batch_gradients(mb_loss, state.params, batch, aux, cfg=cfg, spec=spec,
                                     mesh=mesh, grad_shardings=grad_sh)  # fmt: skip
    schedule = lr_schedule(opt, total_steps)
    no_tokens = metrics["tokens"] == 0
    state, opt_metrics = apply_gradients(
        state, grads, tx, schedule, no_tokens, finite=losses_finite(metrics)
    )
    return state, metrics | opt_metrics


@functools.lru_cache(maxsize=64)
def compile_train_step(
    mb_loss: MicroBatchLoss, spec: LossSpec, cfg: TransformerConfig, opt: OptimizerSpec,
    total_steps: int | None, mesh: Mesh | None, layout: ParamLayout, shapes: Shapes,
):  # fmt: skip
    """`train_step` with ``mb_loss`` jitted for one (spec, model, optimizer, mesh, layout, batch
    shape): explicit shardings, the state donated (it is replaced). Cached, so equal arguments
    reuse the compiled step; ``spec.aux_keys`` inputs are replicated."""
    tx = make_optimizer(opt, total_steps)
    state_sh = state_shardings(cfg, layout, tx, mesh)
    rep = replicated(mesh)
    step = functools.partial(train_step, mb_loss, cfg=cfg, spec=spec, opt=opt,
                             total_steps=total_steps, mesh=mesh)  # fmt: skip
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_shardings(shapes, mesh), {k: rep for k in spec.aux_keys}),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
    )


def run_train_step(
    mb_loss: MicroBatchLoss, state: TrainState, packed: PackedBatch,
    aux: Mapping[str, ArrayLike] | None = None, *,
    cfg: TransformerConfig, spec: LossSpec, opt: OptimizerSpec, total_steps: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, Metrics]:  # fmt: skip
    """Host entry: transfer ``packed`` (and ``aux``, host arrays named by ``spec.aux_keys``,
    replicated) and run the cached compiled step. ``state`` is donated: do not reuse it."""
    aux = {k: np.asarray(v) for k, v in (aux or {}).items()}
    if sorted(aux) != sorted(spec.aux_keys):
        raise ValueError(f"{spec.name}: expected inputs {list(spec.aux_keys)}, got {sorted(aux)}.")
    layout = ParamLayout.of(state.params)
    step = compile_train_step(mb_loss, spec, cfg, opt, total_steps, mesh, layout, packed.shapes())
    rep = replicated(mesh)
    return step(state, put_batch(packed, mesh), {k: put(v, rep) for k, v in aux.items()})
