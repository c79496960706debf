"""Reward-model scoring (MFC ``rew_inf``): the value head's output at each sequence's last
token, ``{"scores": [M, S]}`` (0 for empty slots); `packing.unpack_scalars` returns ``[N]``."""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh

from jaxrlhf.interfaces.inference import inference_inputs, jit_inference
from jaxrlhf.interfaces.microbatch import Batch, Shapes, microbatch_scores
from jaxrlhf.interfaces.packing import PackedBatch
from jaxrlhf.interfaces.state import ParamLayout
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params


def score_outputs(
    params: Params, mb: Batch, *, cfg: TransformerConfig, mesh: Mesh | None = None
) -> dict[str, jax.Array]:
    """``{"scores": [S]}`` for one micro-batch."""
    return {"scores": microbatch_scores(params, cfg, mb, mesh=mesh)}


@functools.lru_cache(maxsize=32)
def compile_scores(cfg: TransformerConfig, mesh: Mesh | None, layout: ParamLayout, shapes: Shapes):
    """The jitted scoring step ``(params, batch) -> {"scores"}``, cached per shape."""
    fn = functools.partial(score_outputs, cfg=cfg, mesh=mesh)
    return jit_inference(fn, cfg, mesh, layout, shapes, {"scores": 2})


def compute_scores(
    params: Params, cfg: TransformerConfig, packed: PackedBatch, *, mesh: Mesh | None = None
) -> dict[str, jax.Array]:
    """Host entry: reward-model scores ``[M, S]`` of ``packed`` (params need a value head)."""
    if "value_head" not in params:
        raise ValueError(
            "compute_scores: params have no value_head; load the reward model with value_head=True."
        )
    shapes, batch = inference_inputs(packed, mesh)
    return compile_scores(cfg, mesh, ParamLayout.of(params), shapes)(params, batch)
