"""Supervised fine-tuning steps: token NLL on response tokens only, over packed micro-batches.

Batch fields (grid ``[M, S, T]``, token-aligned, see `packing.py`): ``loss_mask`` (1 at
response tokens). The loss is the token mean of −log p(token | previous tokens) over every
masked token of the batch; prompt tokens are context only: their log-probs are multiplied by 0,
so they add nothing to the loss or its gradient. Gradient accumulation, exact normalisation by
the whole batch's token count and the skipped empty micro-batches come from `train.train_step`,
so packed and padded layouts of the same sequences give the same loss and update.

Metrics per step: ``loss`` (mean NLL), ``tokens``, ``seqs``, ``grad_norm``, ``lr``,
``update_skipped``. Evaluation (`sft_eval`): summed NLL and token count, hence the mean loss and
the perplexity exp(loss).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf.algorithms import Denominators
from jaxrlhf.interfaces.inference import jit_inference
from jaxrlhf.interfaces.microbatch import (
    Batch,
    Shapes,
    batch_shardings,
    check_batch,
    loss_mask,
    microbatch_logprobs,
    put_batch,
    replicated,
)
from jaxrlhf.interfaces.packing import PackedBatch
from jaxrlhf.interfaces.state import ParamLayout, TrainState, state_shardings
from jaxrlhf.interfaces.train import accumulate_gradients, batch_denominators, train_step
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params
from jaxrlhf.optim import OptimizerSpec, lr_schedule, make_optimizer

REQUIRED = ("loss_mask",)


def masked_nll(logp_st: jax.Array, mask_st: jax.Array, tokens: jax.Array) -> jax.Array:
    """Σ −logp · mask / ``tokens``: this micro-batch's share of the batch's mean NLL."""
    return -jnp.sum(logp_st * mask_st) / jnp.maximum(tokens, 1.0)


def sft_microbatch_loss(
    params: Params,
    mb: Batch,
    den: Denominators,
    *,
    cfg: TransformerConfig,
    logits_chunk: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """This micro-batch's share of the mean response-token NLL (normalised by ``den.tokens``)."""
    logp, _ = microbatch_logprobs(params, cfg, mb, chunk_size=logits_chunk, mesh=mesh)
    mask = loss_mask(mb)
    loss = masked_nll(logp, mask, den.tokens)
    metrics = {
        "loss": loss,
        "tokens": jnp.sum(mask),
        "seqs": jnp.sum(jnp.any(mask > 0, axis=-1), dtype=jnp.float32),
    }
    return loss, jax.lax.stop_gradient(metrics)


def sft_gradients(
    params: Params,
    batch: Batch,
    *,
    cfg: TransformerConfig,
    logits_chunk: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[Params, jax.Array]:
    """Gradient of the batch's mean response NLL and the loss (for tests and diagnostics)."""
    mb_loss = functools.partial(sft_microbatch_loss, cfg=cfg, logits_chunk=logits_chunk, mesh=mesh)
    grads, metrics_m = accumulate_gradients(mb_loss, params, batch, batch_denominators(batch))
    return grads, jnp.sum(metrics_m["loss"])


def sft_train_step(
    state: TrainState,
    batch: Batch,
    *,
    cfg: TransformerConfig,
    opt_cfg: OptimizerSpec,
    total_steps: int | None = None,
    logits_chunk: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Pure SFT update on a stacked packed batch; jit it (or use `compile_sft_train_step`)."""
    check_batch(tuple((k, tuple(v.shape)) for k, v in batch.items()), REQUIRED, "sft")
    layout = ParamLayout.of(state.params)
    tx = make_optimizer(opt_cfg, total_steps)
    grad_shardings = None if mesh is None else state_shardings(cfg, layout, tx, mesh).params
    mb_loss = functools.partial(sft_microbatch_loss, cfg=cfg, logits_chunk=logits_chunk, mesh=mesh)
    return train_step(mb_loss, tx, lr_schedule(opt_cfg, total_steps), state, batch, grad_shardings)


@functools.lru_cache(maxsize=32)
def compile_sft_train_step(
    cfg: TransformerConfig,
    opt_cfg: OptimizerSpec,
    total_steps: int | None,
    mesh: Mesh | None,
    layout: ParamLayout,
    shapes: Shapes,
    logits_chunk: int | None = None,
):
    """`sft_train_step` jitted for one (config, mesh, batch shape), state donated; cached."""
    check_batch(shapes, REQUIRED, "sft")
    tx = make_optimizer(opt_cfg, total_steps)
    state_sh = state_shardings(cfg, layout, tx, mesh)
    step = functools.partial(
        sft_train_step, cfg=cfg, opt_cfg=opt_cfg, total_steps=total_steps,
        logits_chunk=logits_chunk, mesh=mesh,
    )  # fmt: skip
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_shardings(shapes, mesh)),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=0,  # the state is replaced
    )


def sft_train(
    state: TrainState,
    packed: PackedBatch,
    *,
    cfg: TransformerConfig,
    opt_cfg: OptimizerSpec,
    total_steps: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Host entry: transfer ``packed`` and run the cached compiled step. ``state`` is donated."""
    step = compile_sft_train_step(
        cfg, opt_cfg, total_steps, mesh, ParamLayout.of(state.params), packed.shapes()
    )
    return step(state, put_batch(packed, mesh))


# --------------------------------------------------------------------------- evaluation


def nll_outputs(
    params: Params, mb: Batch, *, cfg: TransformerConfig, mesh: Mesh | None = None
) -> dict[str, jax.Array]:
    """``{"nll": [S], "tokens": [S]}``: summed response NLL and response tokens per sequence."""
    logp, _ = microbatch_logprobs(params, cfg, mb, mesh=mesh)
    mask = loss_mask(mb)
    return {"nll": -jnp.sum(logp * mask, axis=-1), "tokens": jnp.sum(mask, axis=-1)}


@functools.lru_cache(maxsize=32)
def compile_nll(cfg: TransformerConfig, mesh: Mesh | None, layout: ParamLayout, shapes: Shapes):
    """The jitted evaluation step ``(params, batch) -> {"nll", "tokens"}``, cached per shape."""
    fn = functools.partial(nll_outputs, cfg=cfg, mesh=mesh)
    return jit_inference(fn, cfg, mesh, layout, shapes, {"nll": 2, "tokens": 2})


def sft_eval(
    params: Params, cfg: TransformerConfig, packed: PackedBatch, *, mesh: Mesh | None = None
) -> tuple[float, float]:
    """Host entry: (summed response NLL, response tokens) of ``packed``."""
    step = compile_nll(cfg, mesh, ParamLayout.of(params), packed.shapes())
    out = jax.device_get(step(params, put_batch(packed, mesh)))
    return float(np.sum(out["nll"], dtype=np.float64)), float(np.sum(out["tokens"]))
