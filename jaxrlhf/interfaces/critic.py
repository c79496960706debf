"""Critic MFCs: value inference (``critic_inf``) and the critic train step (``critic_train``).

Values are token-aligned like log-probs: entry t is the value head's output at position t − 1,
the state token t was generated from (what `algorithms.gae` expects). Train batch fields (grid
``[M, S, T]``): ``loss_mask``, ``returns``, and ``old_values`` when value clipping is on.

Metrics per step: ``loss`` (= ``value_loss``), ``clip_frac``, ``explained_variance`` (over the
whole batch), ``value_mean``, ``return_mean``, ``tokens``, ``seqs``, ``grad_norm``, ``lr``,
``update_skipped``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrlhf.algorithms import Denominators, critic_loss
from jaxrlhf.interfaces.inference import inference_inputs, jit_inference
from jaxrlhf.interfaces.microbatch import (
    Batch,
    Shapes,
    batch_shardings,
    check_batch,
    loss_mask,
    microbatch_values,
    put_batch,
    replicated,
)
from jaxrlhf.interfaces.packing import PackedBatch
from jaxrlhf.interfaces.state import ParamLayout, TrainState, state_shardings
from jaxrlhf.interfaces.train import train_step
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params
from jaxrlhf.optim import OptimizerSpec, lr_schedule, make_optimizer


@dataclasses.dataclass(frozen=True)
class CriticLossSpec:
    """Static settings of the value loss (hashable: compiled steps are cached on it)."""

    value_clip: float | None = 0.2  # needs old_values; None: unclipped
    loss_type: str = "mse"  # mse | huber
    huber_delta: float = 1.0
    aggregation: str = "token_mean"
    norm_constant: float | None = None

    def required_fields(self) -> tuple[str, ...]:
        return ("loss_mask", "returns") + (("old_values",) if self.value_clip else ())


def critic_microbatch_loss(
    params: Params,
    mb: Batch,
    den: Denominators,
    *,
    cfg: TransformerConfig,
    spec: CriticLossSpec,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """This micro-batch's share of the value loss (normalised by the batch's ``den``)."""
    values = microbatch_values(params, cfg, mb, mesh=mesh)
    mask = loss_mask(mb)
    loss, metrics = critic_loss(
        values,
        mb["old_values"] if spec.value_clip else None,
        mb["returns"],
        mask,
        value_clip=spec.value_clip,
        loss_type=spec.loss_type,
        huber_delta=spec.huber_delta,
        aggregation=spec.aggregation,
        denominators=den,
        norm_constant=spec.norm_constant,
    )
    valid = mask > 0
    ret = jnp.where(valid, mb["returns"], 0.0)
    res = jnp.where(valid, ret - jax.lax.stop_gradient(values), 0.0)
    metrics = {k: v for k, v in metrics.items() if k != "explained_variance"} | {
        "value_loss": loss,
        "seqs": jnp.sum(jnp.any(valid, axis=-1), dtype=jnp.float32),
        # Moments summed over micro-batches give the batch's explained variance.
        "sum_ret": jnp.sum(ret),
        "sum_ret2": jnp.sum(ret * ret),
        "sum_res": jnp.sum(res),
        "sum_res2": jnp.sum(res * res),
    }
    return loss, jax.lax.stop_gradient(metrics)


def _explained_variance(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    n = jnp.maximum(metrics["tokens"], 1.0)
    sums = {k: metrics.pop(k) for k in ("sum_ret", "sum_ret2", "sum_res", "sum_res2")}
    var_ret = sums["sum_ret2"] / n - jnp.square(sums["sum_ret"] / n)
    var_res = sums["sum_res2"] / n - jnp.square(sums["sum_res"] / n)
    ok = var_ret > 0
    metrics["explained_variance"] = jnp.where(ok, 1.0 - var_res / jnp.where(ok, var_ret, 1.0), 0.0)
    return metrics


def critic_train_step(
    state: TrainState,
    batch: Batch,
    *,
    cfg: TransformerConfig,
    spec: CriticLossSpec,
    opt_cfg: OptimizerSpec,
    total_steps: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Pure critic update on a stacked packed batch (params need a value head)."""
    check_batch(
        tuple((k, tuple(v.shape)) for k, v in batch.items()), spec.required_fields(), "critic"
    )
    if "value_head" not in state.params:
        raise ValueError(
            "critic: params have no value_head; build the critic with value_head=True."
        )
    layout = ParamLayout.of(state.params)
    tx = make_optimizer(opt_cfg, total_steps)
    grad_shardings = None if mesh is None else state_shardings(cfg, layout, tx, mesh).params
    mb_loss = functools.partial(critic_microbatch_loss, cfg=cfg, spec=spec, mesh=mesh)
    state, metrics = train_step(
        mb_loss, tx, lr_schedule(opt_cfg, total_steps), state, batch, grad_shardings
    )
    return state, _explained_variance(metrics)


@functools.lru_cache(maxsize=32)
def compile_critic_train_step(
    cfg: TransformerConfig,
    spec: CriticLossSpec,
    opt_cfg: OptimizerSpec,
    total_steps: int | None,
    mesh: Mesh | None,
    layout: ParamLayout,
    shapes: Shapes,
):
    """`critic_train_step` jitted for one (config, mesh, batch shape), state donated; cached."""
    check_batch(shapes, spec.required_fields(), "critic")
    tx = make_optimizer(opt_cfg, total_steps)
    state_sh = state_shardings(cfg, layout, tx, mesh)
    step = functools.partial(
        critic_train_step, cfg=cfg, spec=spec, opt_cfg=opt_cfg, total_steps=total_steps, mesh=mesh
    )
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_shardings(shapes, mesh)),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=0,
    )


def critic_train(
    state: TrainState,
    packed: PackedBatch,
    *,
    cfg: TransformerConfig,
    spec: CriticLossSpec,
    opt_cfg: OptimizerSpec,
    total_steps: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Host entry: transfer ``packed`` and run the cached compiled step. ``state`` is donated."""
    step = compile_critic_train_step(
        cfg, spec, opt_cfg, total_steps, mesh, ParamLayout.of(state.params), packed.shapes()
    )
    return step(state, put_batch(packed, mesh))


def value_outputs_mb(
    params: Params, mb: Batch, *, cfg: TransformerConfig, mesh: Mesh | None = None
) -> dict[str, jax.Array]:
    """``{"values": [S, T]}`` for one micro-batch."""
    return {"values": microbatch_values(params, cfg, mb, mesh=mesh)}


@functools.lru_cache(maxsize=32)
def compile_values(cfg: TransformerConfig, mesh: Mesh | None, layout: ParamLayout, shapes: Shapes):
    """The jitted value step ``(params, batch) -> {"values"}``, cached per shape."""
    fn = functools.partial(value_outputs_mb, cfg=cfg, mesh=mesh)
    return jit_inference(fn, cfg, mesh, layout, shapes, {"values": 3})


def compute_values(
    params: Params, cfg: TransformerConfig, packed: PackedBatch, *, mesh: Mesh | None = None
) -> dict[str, jax.Array]:
    """Host entry: token-aligned values (grid ``[M, S, T]`` device arrays) of ``packed``."""
    if "value_head" not in params:
        raise ValueError(
            "compute_values: params have no value_head; build the critic with value_head=True."
        )
    shapes, batch = inference_inputs(packed, mesh)
    return compile_values(cfg, mesh, ParamLayout.of(params), shapes)(params, batch)
