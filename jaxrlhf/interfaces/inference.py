"""The one inference step: a per-micro-batch output function mapped over the stacked packed
batch (`lax.map`, so only one micro-batch's activations are live), jitted with explicit
shardings by `compile_inference` (cached per shape) and run by `run_inference`. Params are read,
not donated; only the model inputs and index arrays travel.

An output function is ``mb_fn(params, mb, *, cfg, mesh, **options) -> {name: [S] or [S, T]}``
(log-probs, values, scores, NLL); outputs come back stacked ``[M, S]`` / ``[M, S, T]``, sharded
like the batch. ``options`` are static (hashable) keyword arguments of ``mb_fn``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf.hostio import put
from jaxrlhf.interfaces.microbatch import Batch, Shapes, batch_shardings, check_batch
from jaxrlhf.interfaces.packing import INDEX_KEYS, ROW_KEYS, PackedBatch
from jaxrlhf.interfaces.state import ParamLayout, abstract_params
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.handle import param_shardings
from jaxrlhf.models.transformer import Params

Outputs = dict[str, jax.Array]
MicroBatchFn = Callable[[Params, Batch], Outputs]
INPUT_KEYS = ROW_KEYS + INDEX_KEYS


def map_microbatches(fn: MicroBatchFn, params: Params, batch: Batch) -> Outputs:
    """``fn`` on each micro-batch; outputs stacked on a leading ``[M]`` axis. Empty (filler)
    micro-batches are skipped and give zeros."""
    chex.assert_equal_shape_prefix(list(batch.values()), 1)  # one [M] axis to map over

    def one(mb: Batch) -> Outputs:
        compute = lambda b: fn(params, b)
        shapes = jax.eval_shape(compute, mb)
        zeros = lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.cond(jnp.any(mb["seq_lens"] > 0), compute, zeros, mb)

    return jax.lax.map(one, batch)


@functools.lru_cache(maxsize=64)
def compile_inference(
    mb_fn: Callable[..., Outputs], cfg: TransformerConfig, mesh: Mesh | None,
    layout: ParamLayout, shapes: Shapes, options: tuple[tuple[str, Any], ...] = (),
):  # fmt: skip
    """``map_microbatches(mb_fn)`` jitted for one (function, options, model, mesh, layout, input
    shape); cached. Output shapes (hence shardings) come from tracing ``mb_fn`` abstractly."""
    check_batch(shapes, (), getattr(mb_fn, "__name__", "inference"))
    fn = functools.partial(mb_fn, cfg=cfg, mesh=mesh, **dict(options))
    step = functools.partial(map_microbatches, fn)
    # packing's dtypes: int32 model inputs and indices, float32 grid fields
    dtype = lambda k: jnp.int32 if k in INPUT_KEYS else jnp.float32
    inputs = {k: jax.ShapeDtypeStruct(s, dtype(k)) for k, s in shapes}
    outputs = jax.eval_shape(step, abstract_params(cfg, layout), inputs)
    return jax.jit(
        step,
        in_shardings=(
            param_shardings(cfg, mesh, lm_head=layout.lm_head, value_head=layout.value_head),
            batch_shardings(shapes, mesh),
        ),
        out_shardings=batch_shardings(tuple((k, v.shape) for k, v in outputs.items()), mesh),
    )


def run_inference(
    mb_fn: Callable[..., Outputs], params: Params, cfg: TransformerConfig,
    packed: PackedBatch, *, mesh: Mesh | None = None, fields: tuple[str, ...] = (),
    **options: Any,
) -> Outputs:  # fmt: skip
    """Host entry: ``mb_fn``'s outputs (device arrays, ``[M, S]`` or ``[M, S, T]``) over
    ``packed``; only its model inputs, index arrays and the grid ``fields`` ``mb_fn`` reads are
    transferred."""
    shapes = tuple((k, s) for k, s in packed.shapes() if k in INPUT_KEYS + fields)
    shardings = batch_shardings(shapes, mesh)
    batch = {k: put(np.asarray(packed.arrays[k]), shardings[k]) for k, _ in shapes}
    layout = ParamLayout.of(params)
    step = compile_inference(mb_fn, cfg, mesh, layout, shapes, tuple(sorted(options.items())))
    return step(params, batch)
