"""Shared machinery of the inference MFCs: a per-micro-batch function mapped over the stacked
packed batch (`lax.map`, so only one micro-batch's activations are live), jitted with explicit
shardings. Params are read, not donated; only the model inputs and index arrays travel."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf.hostio import put
from jaxrlhf.interfaces.microbatch import Batch, Shapes, batch_shardings, check_batch
from jaxrlhf.interfaces.packing import INDEX_KEYS, ROW_KEYS, PackedBatch
from jaxrlhf.interfaces.state import ParamLayout
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.handle import param_shardings
from jaxrlhf.models.transformer import Params

MicroBatchFn = Callable[[Params, Batch], dict[str, jax.Array]]
INPUT_KEYS = ROW_KEYS + INDEX_KEYS


def map_microbatches(fn: MicroBatchFn, params: Params, batch: Batch) -> dict[str, jax.Array]:
    """``fn`` on each micro-batch; outputs stacked on a leading ``[M]`` axis. Empty (filler)
    micro-batches are skipped and give zeros."""

    def one(mb: Batch) -> dict[str, jax.Array]:
        compute = lambda b: fn(params, b)
        shapes = jax.eval_shape(compute, mb)
        zeros = lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.cond(jnp.any(mb["seq_lens"] > 0), compute, zeros, mb)

    return jax.lax.map(one, batch)


def jit_inference(
    fn: MicroBatchFn,
    cfg: TransformerConfig,
    mesh: Mesh | None,
    layout: ParamLayout,
    shapes: Shapes,
    out_ranks: dict[str, int],
):
    """``map_microbatches(fn)`` jitted; ``out_ranks`` gives each output's rank (3: grid
    ``[M, S, T]``, 2: per sequence ``[M, S]``), which shards it like the batch."""
    check_batch(shapes, (), "inference")
    grid = dict(shapes)["token_index"]
    out_shapes = tuple((k, grid[:rank]) for k, rank in out_ranks.items())
    return jax.jit(
        functools.partial(map_microbatches, fn),
        in_shardings=(
            param_shardings(cfg, mesh, lm_head=layout.lm_head, value_head=layout.value_head),
            batch_shardings(shapes, mesh),
        ),
        out_shardings=batch_shardings(out_shapes, mesh),
    )


def inference_inputs(packed: PackedBatch, mesh: Mesh | None) -> tuple[Shapes, Batch]:
    """The model inputs and index arrays of ``packed``, on the devices, and their shapes."""
    shapes = tuple((k, s) for k, s in packed.shapes() if k in INPUT_KEYS)
    shardings = batch_shardings(shapes, mesh)
    batch = {k: put(np.asarray(packed.arrays[k]), shardings[k]) for k, _ in shapes}
    return shapes, batch
