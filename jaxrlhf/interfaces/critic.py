"""Critic MFCs: value inference (``critic_inf``, `compute_values`) and the critic's micro-batch
value loss (``critic_train``: `train.run_train_step(critic_microbatch_loss, ...)`).

Values are token-aligned like log-probs: entry t is the value head's output at position t − 1,
the state token t was generated from (what `algorithms.gae` expects). Train batch fields (grid
``[M, S, T]``): ``loss_mask``, ``returns``, and ``old_values`` when value clipping is on.

Metrics per step: ``loss`` (= ``value_loss``), ``clip_frac``, ``explained_variance`` (over the
whole batch), ``value_mean``, ``return_mean``, ``tokens``, ``seqs``, ``grad_norm``, ``lr``,
``update_skipped``, ``nonfinite_skipped``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrlhf.algorithms import Denominators, critic_loss
from jaxrlhf.interfaces.inference import Outputs, run_inference
from jaxrlhf.interfaces.microbatch import Batch, loss_mask, microbatch_values
from jaxrlhf.interfaces.train import LossSpec, Metrics
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params


@dataclasses.dataclass(frozen=True)
class CriticLossSpec(LossSpec):
    """Static settings of the value loss (hashable: compiled steps are cached on it)."""

    name: ClassVar[str] = "critic"

    value_clip: float | None = 0.2  # needs old_values; None: unclipped
    loss_type: str = "mse"  # mse | huber
    huber_delta: float = 1.0
    aggregation: str = "token_mean"
    norm_constant: float | None = None

    def required_fields(self) -> tuple[str, ...]:
        """``loss_mask``, ``returns``, and ``old_values`` when the value loss is clipped."""
        return ("loss_mask", "returns") + (("old_values",) if self.value_clip else ())

    def finish(self, metrics: Metrics) -> Metrics:
        """The batch's explained variance from the moments summed over micro-batches."""
        n = jnp.maximum(metrics["tokens"], 1.0)
        sums = {k: metrics.pop(k) for k in ("sum_ret", "sum_ret2", "sum_res", "sum_res2")}
        var_ret = sums["sum_ret2"] / n - jnp.square(sums["sum_ret"] / n)
        var_res = sums["sum_res2"] / n - jnp.square(sums["sum_res"] / n)
        ok = var_ret > 0
        ev = jnp.where(ok, 1.0 - var_res / jnp.where(ok, var_ret, 1.0), 0.0)
        return metrics | {"explained_variance": ev}


def critic_microbatch_loss(
    params: Params, mb: Batch, den: Denominators, *, cfg: TransformerConfig, spec: CriticLossSpec,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Metrics]:  # fmt: skip
    """This micro-batch's share of the value loss (normalised by the batch's ``den``)."""
    values = microbatch_values(params, cfg, mb, mesh=mesh)
    mask = loss_mask(mb)
    loss, metrics = critic_loss(
        values, mb["old_values"] if spec.value_clip else None, mb["returns"], mask,
        value_clip=spec.value_clip, loss_type=spec.loss_type, huber_delta=spec.huber_delta,
        aggregation=spec.aggregation, denominators=den, norm_constant=spec.norm_constant,
    )  # fmt: skip
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


def value_outputs_mb(
    params: Params, mb: Batch, *, cfg: TransformerConfig, mesh: Mesh | None = None
) -> Outputs:
    """``{"values": [S, T]}`` for one micro-batch."""
    return {"values": microbatch_values(params, cfg, mb, mesh=mesh)}


# Host entry: token-aligned values (grid ``[M, S, T]`` device arrays) of a packed batch:
# ``compute_values(params, cfg, packed, mesh=None)`` (params need a value head).
compute_values = functools.partial(run_inference, value_outputs_mb)
