"""Bradley-Terry reward-model training: loss −log σ(r_chosen − r_rejected) over preference
pairs, where r is the value head's output at a sequence's last token (`microbatch_scores`, the
same score the PPO graph's ``rm_inf`` uses).

Layout: both sequences of every pair are packed like any other sequences (`pack_pairs`), so a
pair may straddle two micro-batches; ``pairs`` (``chosen`` / ``rejected``: flat slot indices
``m * S + s`` into the ``[M, S]`` score grid, ``valid``: 1 for a real pair) says which scores
meet. The step is exact anyway, in two passes inside one jit: (1) every score, without gradient,
gives the loss and dL/dr_i per sequence (`RMLossSpec.prepare`); (2) gradient accumulation over
micro-batches of Σ_i (dL/dr_i) · r_i (`rm_microbatch_loss`), whose gradient is the BT loss's
(chain rule). The price is one extra forward pass; the gain is that pairs never constrain
packing. Training is `train.run_train_step(rm_microbatch_loss, state, packed, pairs,
spec=RMLossSpec(), ...)`; the loss maths is `algorithms.bradley_terry`.

Metrics: ``loss``, ``accuracy`` (fraction with r_chosen > r_rejected; ties count as wrong),
``margin`` (mean r_chosen − r_rejected), ``chosen_score``, ``rejected_score``, ``pairs``,
``tokens``, ``grad_norm``, ``lr``, ``update_skipped``, ``nonfinite_skipped``. The head's bias
is not trained (the loss does not depend on it), so exported models need no ``score.bias``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from numpy.typing import ArrayLike

from jaxrlhf.algorithms import Denominators, bradley_terry
from jaxrlhf.hostio import fetch
from jaxrlhf.interfaces.inference import map_microbatches
from jaxrlhf.interfaces.microbatch import Batch, loss_mask, microbatch_scores
from jaxrlhf.interfaces.packing import PackedBatch, pack_sequences, power_of_two
from jaxrlhf.interfaces.reward import compute_scores
from jaxrlhf.interfaces.train import LossSpec, Metrics
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params

PAIR_KEYS = ("chosen", "rejected", "valid")  # int32 [P] slot indices, float32 [P] (1: real)


@dataclasses.dataclass(frozen=True)
class RMLossSpec(LossSpec):
    """The Bradley-Terry step: pass (1) of the module docstring, over the ``pairs`` input."""

    name: ClassVar[str] = "rm"
    aux_keys: ClassVar[tuple[str, ...]] = PAIR_KEYS

    def prepare(
        self, params: Params, batch: Batch, aux: Batch, *, cfg: TransformerConfig,
        mesh: Mesh | None,
    ) -> tuple[Batch, Metrics]:  # fmt: skip
        """Every score without gradient -> the BT loss and metrics, and ``coef`` ``[M, S]``:
        dL/dr of each sequence slot, the weights of pass (2)."""
        pairs = [aux[k] for k in PAIR_KEYS]
        chex.assert_rank(pairs, 1)
        chex.assert_equal_shape(pairs)
        score_fn = lambda p, mb: {"r": microbatch_scores(p, cfg, mb, mesh=mesh)}
        scores_ms = jax.lax.stop_gradient(map_microbatches(score_fn, params, batch)["r"])

        def loss_of(flat: jax.Array) -> tuple[jax.Array, Metrics]:
            return bradley_terry(flat[aux["chosen"]], flat[aux["rejected"]], aux["valid"])

        coef, metrics = jax.grad(loss_of, has_aux=True)(scores_ms.reshape(-1))
        return batch | {"coef": coef.reshape(scores_ms.shape)}, metrics


def rm_microbatch_loss(
    params: Params, mb: Batch, den: Denominators, *, cfg: TransformerConfig, spec: RMLossSpec,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Metrics]:  # fmt: skip
    """Σ_s coef_s · r_s: its gradient is this micro-batch's part of the BT gradient (``coef``
    already carries the batch normalisation, so ``den`` is not needed)."""
    del den, spec
    # BT is shift-invariant: the head bias's gradient is 0 up to rounding, which Adam would
    # blow up to lr-sized steps. No gradient flows to it, so the bias keeps its start value.
    head = params["value_head"]
    params = params | {"value_head": head | {"bias": jax.lax.stop_gradient(head["bias"])}}
    scores = microbatch_scores(params, cfg, mb, mesh=mesh)
    return jnp.sum(mb["coef"] * scores), {"tokens": jnp.sum(loss_mask(mb))}


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
