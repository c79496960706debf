"""Log-prob inference (MFCs ``ref_inf`` and ``actor_inf``): per-token log-probs of a packed
batch under some params — the frozen reference policy, or the actor before its update (the
proximal log-probs of decoupled PPO, and π_old of synchronous PPO).

Output ``logp`` ``[M, S, T]`` is token-aligned (entry t scores token t from position t − 1;
0 at token 0, beyond each length and in empty slots); `packing.unpack` returns it per sequence.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh

from jaxrlhf.interfaces.inference import inference_inputs, jit_inference
from jaxrlhf.interfaces.microbatch import Batch, Shapes, microbatch_logprobs
from jaxrlhf.interfaces.packing import PackedBatch
from jaxrlhf.interfaces.state import ParamLayout
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params


def logprob_outputs(
    params: Params,
    mb: Batch,
    *,
    cfg: TransformerConfig,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    mesh: Mesh | None = None,
) -> dict[str, jax.Array]:
    """``{"logp": [S, T]}`` (and ``"entropy"``) for one micro-batch."""
    logp, entropy = microbatch_logprobs(
        params,
        cfg,
        mb,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        mesh=mesh,
    )
    return {"logp": logp} | ({"entropy": entropy} if with_entropy else {})


@functools.lru_cache(maxsize=32)
def compile_logprobs(
    cfg: TransformerConfig,
    mesh: Mesh | None,
    layout: ParamLayout,
    shapes: Shapes,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
):
    """The jitted log-prob step ``(params, batch) -> {"logp", ["entropy"]}``, cached per shape."""
    fn = functools.partial(
        logprob_outputs,
        cfg=cfg,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        mesh=mesh,
    )
    ranks = {"logp": 3} | ({"entropy": 3} if with_entropy else {})
    return jit_inference(fn, cfg, mesh, layout, shapes, ranks)


def compute_logprobs(
    params: Params,
    cfg: TransformerConfig,
    packed: PackedBatch,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    mesh: Mesh | None = None,
) -> dict[str, jax.Array]:
    """Host entry: token log-probs (grid ``[M, S, T]`` device arrays) of ``packed``."""
    shapes, batch = inference_inputs(packed, mesh)
    step = compile_logprobs(
        cfg, mesh, ParamLayout.of(params), shapes, temperature, chunk_size, with_entropy
    )
    return step(params, batch)
