"""Bradley-Terry reward-model training: loss −log σ(r_chosen − r_rejected) over preference
pairs, where r is the value head's output at a sequence's last token (`microbatch_scores`, the
same score the PPO graph's ``rm_inf`` uses).

Layout: both sequences of every pair are packed like any other sequences (`pack_pairs`), so a
pair may straddle two micro-batches; ``pairs`` (``chosen`` / ``rejected``: flat slot indices
``m * S + s`` into the ``[M, S]`` score grid, ``valid``: 1 for a real pair) says which scores
meet. The step is exact anyway, in two passes inside one jit: (1) every score, without gradient,
gives the loss and dL/dr_i per sequence; (2) gradient accumulation over micro-batches of
Σ_i (dL/dr_i) · r_i, whose gradient is the BT loss's (chain rule). The price is one extra
forward pass; the gain is that pairs never constrain packing.

Metrics: ``loss``, ``accuracy`` (fraction with r_chosen > r_rejected; ties count as wrong),
``margin`` (mean r_chosen − r_rejected), ``chosen_score``, ``rejected_score``, ``pairs``,
``tokens``, ``grad_norm``, ``lr``, ``update_skipped``. The head's bias is not trained (the loss
does not depend on it), so exported models need no ``score.bias``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from numpy.typing import ArrayLike

from jaxrlhf.algorithms import Denominators
from jaxrlhf.hostio import fetch
from jaxrlhf.interfaces.inference import map_microbatches
from jaxrlhf.interfaces.microbatch import (
    Batch,
    Shapes,
    batch_shardings,
    check_batch,
    loss_mask,
    microbatch_scores,
    put_batch,
    replicated,
)
from jaxrlhf.interfaces.packing import PackedBatch, pack_sequences, power_of_two
from jaxrlhf.interfaces.reward import compute_scores
from jaxrlhf.interfaces.state import ParamLayout, TrainState, state_shardings
from jaxrlhf.interfaces.train import accumulate_gradients, apply_gradients, batch_denominators
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params
from jaxrlhf.optim import OptimizerSpec, lr_schedule, make_optimizer

Pairs = dict[str, jax.Array]  # chosen, rejected (int32 [P]), valid (float32 [P])


def bradley_terry(
    chosen_p: jax.Array, rejected_p: jax.Array, valid_p: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean −log σ(r_c − r_r) over the valid pairs, and the pairwise metrics."""
    chosen_p = jnp.asarray(chosen_p, jnp.float32)
    rejected_p = jnp.asarray(rejected_p, jnp.float32)
    valid = jnp.ones_like(chosen_p) if valid_p is None else jnp.asarray(valid_p, jnp.float32)
    n = jnp.maximum(jnp.sum(valid), 1.0)
    diff = chosen_p - rejected_p
    mean = lambda x: jnp.sum(x * valid) / n
    loss = mean(jax.nn.softplus(-diff))  # −log σ(d), stable for large |d|
    metrics = {
        "loss": loss,
        "accuracy": mean((diff > 0).astype(jnp.float32)),
        "margin": mean(diff),
        "chosen_score": mean(chosen_p),
        "rejected_score": mean(rejected_p),
        "pairs": jnp.sum(valid),
    }
    return loss, metrics


def pack_pairs(
    chosen: Sequence[ArrayLike],
    rejected: Sequence[ArrayLike],
    *,
    max_tokens_per_mb: int,
    row_len: int | None = None,
    rows_multiple: int = 1,
    pack: bool = True,
) -> tuple[PackedBatch, dict[str, np.ndarray]]:
    """Pack every chosen and rejected sequence; ``loss_mask`` marks each one's last token (the
    scored one). Returns the batch and the ``pairs`` index arrays (padded to a power of two)."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"pack_pairs: got {len(chosen)} chosen and {len(rejected)} rejected.")
    seqs = [np.asarray(x, np.int32) for pair in zip(chosen, rejected, strict=True) for x in pair]
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise ValueError(f"pack_pairs: sequence {i} has {len(s)} tokens; a pair needs >= 2.")
    last = [np.eye(len(s), dtype=np.float32)[-1] for s in seqs]
    packed = pack_sequences(
        seqs, {"loss_mask": last}, max_tokens_per_mb=max_tokens_per_mb, row_len=row_len,
        rows_multiple=rows_multiple, pack=pack,
    )  # fmt: skip
    slot_of = np.zeros(len(seqs), np.int32)
    filled = packed.seq_index >= 0
    slot_of[packed.seq_index[filled]] = np.flatnonzero(filled.reshape(-1))
    n, width = len(chosen), power_of_two(len(chosen))
    pairs = {
        "chosen": np.zeros(width, np.int32),
        "rejected": np.zeros(width, np.int32),
        "valid": np.zeros(width, np.float32),
    }
    pairs["chosen"][:n], pairs["rejected"][:n] = slot_of[0::2], slot_of[1::2]
    pairs["valid"][:n] = 1.0
    return packed, pairs


def _score_microbatch(
    params: Params, mb: Batch, *, cfg: TransformerConfig, mesh: Mesh | None
) -> jax.Array:
    return microbatch_scores(params, cfg, mb, mesh=mesh)


def _weighted_scores_loss(
    params: Params, mb: Batch, den: Denominators, *, cfg: TransformerConfig, mesh: Mesh | None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Σ_s coef_s · r_s: its gradient is this micro-batch's part of the BT gradient."""
    scores = _score_microbatch(params, mb, cfg=cfg, mesh=mesh)
    del den  # coef already carries the batch normalisation
    return jnp.sum(mb["coef"] * scores), {"tokens": jnp.sum(loss_mask(mb))}


def rm_gradients(
    params: Params,
    batch: Batch,
    pairs: Pairs,
    *,
    cfg: TransformerConfig,
    mesh: Mesh | None = None,
    grad_shardings: object | None = None,
) -> tuple[Params, dict[str, jax.Array]]:
    """Exact gradient of the batch's mean BT loss (the two passes of the module docstring)."""
    score_fn = lambda p, mb: {"r": _score_microbatch(p, mb, cfg=cfg, mesh=mesh)}
    scores_ms = jax.lax.stop_gradient(map_microbatches(score_fn, params, batch)["r"])
    flat = scores_ms.reshape(-1)

    def loss_of(flat_scores: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        c, r = flat_scores[pairs["chosen"]], flat_scores[pairs["rejected"]]
        return bradley_terry(c, r, pairs["valid"])

    coef, metrics = jax.grad(loss_of, has_aux=True)(flat)  # dL/dr_i per sequence slot
    coef_ms = coef.reshape(scores_ms.shape)
    mb_loss = functools.partial(_weighted_scores_loss, cfg=cfg, mesh=mesh)
    grads, mb_metrics = accumulate_gradients(
        mb_loss, params, batch | {"coef": coef_ms}, batch_denominators(batch), grad_shardings
    )
    # The BT loss is shift-invariant: the head bias's gradient is 0, up to rounding that Adam
    # would blow up to lr-sized steps. Pin it to exactly 0 so the bias keeps its start value.
    head = grads["value_head"]
    grads = grads | {"value_head": head | {"bias": jnp.zeros_like(head["bias"])}}
    return grads, metrics | {"tokens": jnp.sum(mb_metrics["tokens"])}


def rm_train_step(
    state: TrainState,
    batch: Batch,
    pairs: Pairs,
    *,
    cfg: TransformerConfig,
    opt_cfg: OptimizerSpec,
    total_steps: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Pure BT update on a stacked packed batch (params need a value head)."""
    check_batch(tuple((k, tuple(v.shape)) for k, v in batch.items()), ("loss_mask",), "rm")
    if "value_head" not in state.params:
        raise ValueError("rm: params have no value_head; build the model with value_head=True.")
    layout = ParamLayout.of(state.params)
    tx = make_optimizer(opt_cfg, total_steps)
    grad_sh = None if mesh is None else state_shardings(cfg, layout, tx, mesh).params
    grads, metrics = rm_gradients(state.params, batch, pairs, cfg=cfg, mesh=mesh,
                                  grad_shardings=grad_sh)  # fmt: skip
    skip = metrics["pairs"] == 0
    state, opt_metrics = apply_gradients(state, grads, tx, lr_schedule(opt_cfg, total_steps), skip)
    return state, metrics | opt_metrics


@functools.lru_cache(maxsize=32)
def compile_rm_train_step(
    cfg: TransformerConfig,
    opt_cfg: OptimizerSpec,
    total_steps: int | None,
    mesh: Mesh | None,
    layout: ParamLayout,
    shapes: Shapes,
    num_pairs: int,
):
    """`rm_train_step` jitted for one (config, mesh, batch shape, pair count), state donated."""
    check_batch(shapes, ("loss_mask",), "rm")
    tx = make_optimizer(opt_cfg, total_steps)
    state_sh = state_shardings(cfg, layout, tx, mesh)
    step = functools.partial(
        rm_train_step, cfg=cfg, opt_cfg=opt_cfg, total_steps=total_steps, mesh=mesh
    )
    rep = replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_shardings(shapes, mesh), {k: rep for k in PAIR_KEYS}),
        out_shardings=(state_sh, rep),
        donate_argnums=0,  # the state is replaced
    )


PAIR_KEYS = ("chosen", "rejected", "valid")


def rm_train(
    state: TrainState,
    packed: PackedBatch,
    pairs: dict[str, np.ndarray],
    *,
    cfg: TransformerConfig,
    opt_cfg: OptimizerSpec,
    total_steps: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Host entry: transfer the batch and pairs, run the cached compiled step (state donated)."""
    step = compile_rm_train_step(
        cfg, opt_cfg, total_steps, mesh, ParamLayout.of(state.params), packed.shapes(),
        len(pairs["valid"]),
    )  # fmt: skip
    rep = replicated(mesh)
    on_device = {k: jax.device_put(np.asarray(pairs[k]), rep) for k in PAIR_KEYS}
    return step(state, put_batch(packed, mesh), on_device)


def rm_eval(
    params: Params,
    cfg: TransformerConfig,
    packed: PackedBatch,
    pairs: dict[str, np.ndarray],
    *,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Host entry: BT loss and pairwise metrics of ``packed`` pairs under ``params``."""
    scores = fetch(compute_scores(params, cfg, packed, mesh=mesh)["scores"])  # gathers shards
    flat = scores.reshape(-1)
    _, metrics = bradley_terry(flat[pairs["chosen"]], flat[pairs["rejected"]], pairs["valid"])
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
