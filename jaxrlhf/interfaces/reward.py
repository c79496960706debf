"""Reward-model scoring (MFC ``rm_inf``, the `system.mfcs.RewardModel` interface): a trained
reward model's score of each whole sequence, the value head's output at its last token,
``{"scores": [M, S]}`` (0 for empty slots); `packing.unpack_scalars` returns ``[N]``. The same
score is what `rm.py` trains with the Bradley-Terry loss."""

from __future__ import annotations

import functools

from jax.sharding import Mesh

from jaxrlhf.interfaces.inference import Outputs, run_inference
from jaxrlhf.interfaces.microbatch import Batch, microbatch_scores
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params


def score_outputs(
    params: Params, mb: Batch, *, cfg: TransformerConfig, mesh: Mesh | None = None
) -> Outputs:
    """``{"scores": [S]}`` for one micro-batch."""
    return {"scores": microbatch_scores(params, cfg, mb, mesh=mesh)}


# Host entry: ``compute_scores(params, cfg, packed, *, mesh=None)`` -> reward-model scores
# ``[M, S]`` (device arrays; params need a value head).
compute_scores = functools.partial(run_inference, score_outputs)
