"""Supervised fine-tuning: the token NLL on response tokens only, over packed micro-batches.

Batch fields (grid ``[M, S, T]``, token-aligned, see `packing.py`): ``loss_mask`` (1 at
response tokens). The loss is the token mean of −log p(token | previous tokens) over every
masked token of the batch (`algorithms.masked_nll`); prompt tokens are context only: their
log-probs are multiplied by 0, so they add nothing to the loss or its gradient. Training is
`train.run_train_step(sft_microbatch_loss, ..., spec=SFTLossSpec())`: gradient accumulation,
exact normalisation by the whole batch's token count and the skipped empty micro-batches come
from there, so packed and padded layouts of the same sequences give the same loss and update.

Metrics per step: ``loss`` (mean NLL), ``tokens``, ``seqs``, ``grad_norm``, ``lr``,
``update_skipped``, ``nonfinite_skipped``. Evaluation (`sft_eval`): summed NLL and token count,
hence the mean loss and the perplexity exp(loss).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf.algorithms import Denominators, masked_nll
from jaxrlhf.hostio import fetch
from jaxrlhf.interfaces.inference import Outputs, run_inference
from jaxrlhf.interfaces.microbatch import Batch, loss_mask, microbatch_logprobs
from jaxrlhf.interfaces.packing import PackedBatch
from jaxrlhf.interfaces.train import LossSpec, Metrics
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params


@dataclasses.dataclass(frozen=True)
class SFTLossSpec(LossSpec):
    """Static settings of the SFT loss (hashable: compiled steps are cached on it)."""

    name: ClassVar[str] = "sft"

    logits_chunk: int | None = None  # tokens per chunk of the log-prob pass (memory bound)


def sft_microbatch_loss(
    params: Params, mb: Batch, den: Denominators, *, cfg: TransformerConfig, spec: SFTLossSpec,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Metrics]:  # fmt: skip
    """This micro-batch's share of the mean response-token NLL (normalised by ``den.tokens``)."""
    logp, _ = microbatch_logprobs(params, cfg, mb, chunk_size=spec.logits_chunk, mesh=mesh)
    mask = loss_mask(mb)
    loss = masked_nll(logp, mask, den.tokens)
    metrics = {
        "loss": loss,
        "tokens": jnp.sum(mask),
        "seqs": jnp.sum(jnp.any(mask > 0, axis=-1), dtype=jnp.float32),
    }
    return loss, jax.lax.stop_gradient(metrics)


def nll_outputs(
    params: Params, mb: Batch, *, cfg: TransformerConfig, mesh: Mesh | None = None
) -> Outputs:
    """``{"nll": [S], "tokens": [S]}``: summed response NLL and response tokens per sequence."""
    logp, _ = microbatch_logprobs(params, cfg, mb, mesh=mesh)
    mask = loss_mask(mb)
    return {"nll": -jnp.sum(logp * mask, axis=-1), "tokens": jnp.sum(mask, axis=-1)}


def sft_eval(
    params: Params, cfg: TransformerConfig, packed: PackedBatch, *, mesh: Mesh | None = None
) -> tuple[float, float]:
    """Host entry: (summed response NLL, response tokens) of ``packed``."""
    out = run_inference(nll_outputs, params, cfg, packed, mesh=mesh, fields=("loss_mask",))
    out = fetch(out)  # gathers shards
    return float(np.sum(out["nll"], dtype=np.float64)), float(np.sum(out["tokens"]))
