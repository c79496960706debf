"""Device side of the packed layout (`packing.py`): shardings, transfer, and model outputs moved
from packed rows ``[R, L]`` onto the per-sequence grid ``[S, T]`` with the next-token shift.

Row arrays shard their rows, grid arrays their sequence slots, over the batch mesh axes
(data × fsdp); the micro-batch axis M stays whole because steps `lax.scan` over it.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxrlhf.hostio import put
from jaxrlhf.interfaces.packing import INDEX_KEYS, ROW_KEYS, PackedBatch
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.sharding import logical_to_spec
from jaxrlhf.models.transformer import Params, hidden_states, token_logprobs, value_outputs

Batch = dict[str, jax.Array]
Shapes = tuple[tuple[str, tuple[int, ...]], ...]


def replicated(mesh: Mesh | None) -> jax.sharding.Sharding:
    """Whole array on every device (single device without a mesh)."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, PartitionSpec())


def batch_shardings(shapes: Shapes, mesh: Mesh | None) -> dict[str, jax.sharding.Sharding]:
    """Sharding of each packed array: ``[M, R|S, L|T]`` and ``[M, S]`` over their 2nd axis."""
    if mesh is None:
        return {k: replicated(None) for k, _ in shapes}
    axes = {2: (None, "batch"), 3: (None, "batch", "seq")}
    return {k: NamedSharding(mesh, logical_to_spec(axes[len(s)], s, mesh)) for k, s in shapes}


def shapes_of(batch: Batch) -> Shapes:
    """The `Shapes` of a batch of (possibly traced) arrays."""
    return tuple((k, tuple(v.shape)) for k, v in batch.items())


def check_batch(shapes: Shapes, required: tuple[str, ...], where: str) -> None:
    """Raise ValueError (one sentence) unless the packed arrays are present and consistent."""
    have = dict(shapes)
    missing = [k for k in (*ROW_KEYS, *INDEX_KEYS, *required) if k not in have]
    if missing:
        raise ValueError(f"{where}: the batch lacks {', '.join(missing)} (have {sorted(have)}).")
    rows, grid = have["input_ids"], have["token_index"]
    bad = [f"{k} {s}" for k in ROW_KEYS if (s := have[k]) != rows or len(s) != 3]
    fields = [k for k in have if k not in (*ROW_KEYS, *INDEX_KEYS)]
    bad += [f"{k} {s}" for k in ("token_index", *fields) if (s := have[k]) != grid or len(s) != 3]
    if have["seq_lens"] != grid[:2] or rows[0] != grid[0]:
        bad.append(f"seq_lens {have['seq_lens']}")
    if bad:
        raise ValueError(
            f"{where}: rows must all be {rows} ([M, R, L]) and grid arrays {grid} ([M, S, T]) "
            f"with seq_lens [M, S]; got {', '.join(bad)}."
        )


def put_batch(packed: PackedBatch, mesh: Mesh | None) -> Batch:
    """Transfer a packed batch (the global batch, the same on every process) to the devices
    with `batch_shardings`; each process copies only its own shards."""
    shardings = batch_shardings(packed.shapes(), mesh)
    return {k: put(np.asarray(v), shardings[k]) for k, v in packed.arrays.items()}


def scored_mask(seq_lens_s: jax.Array, length: int) -> jax.Array:
    """``[S, T]`` True where token t has a log-prob / value: 1 <= t < sequence length."""
    t = jnp.arange(length)[None, :]
    return (t >= 1) & (t < seq_lens_s[:, None])


def loss_mask(mb: Batch) -> jax.Array:
    """``loss_mask`` restricted to scored tokens, as float32 ``[S, T]``."""
    scored = scored_mask(mb["seq_lens"], mb["token_index"].shape[-1])
    return jnp.where(scored & (mb["loss_mask"] > 0), 1.0, 0.0)


def rows_to_grid(values_rl: jax.Array, token_index_st: jax.Array, shift: int) -> jax.Array:
    """Grid ``[S, T]`` of row values taken ``shift`` tokens before each grid token.

    shift=1 is the next-token shift: the output at position t − 1 scores token t. Entries
    with no source (t < shift) hold arbitrary values: mask them.
    """
    flat = values_rl.reshape(-1)
    return flat[jnp.maximum(token_index_st - shift, 0)]


def _hidden(
    params: Params, cfg: TransformerConfig, mb: Batch, mesh: Mesh | None, value_head: bool = False
) -> jax.Array:
    """Hidden states ``[R, L, D]`` of one micro-batch's rows, after checking its layout (at trace
    time): rows ``[R, L]``, ``token_index`` and grid fields ``[S, T]``, ``seq_lens`` ``[S]``."""
    if value_head and "value_head" not in params:
        raise ValueError("params have no value_head; build the model with value_head=True.")
    rows = [mb[k] for k in ROW_KEYS]
    chex.assert_rank(rows, 2)
    chex.assert_equal_shape(rows)
    chex.assert_rank(mb["token_index"], 2)
    grid_st = mb["token_index"].shape
    for key, value in mb.items():  # grid fields [S, T], per-sequence fields [S]
        if key not in ROW_KEYS:
            chex.assert_shape(value, grid_st if value.ndim > 1 else grid_st[:1])
    return hidden_states(params, cfg, *rows, mesh)


def microbatch_logprobs(
    params: Params,
    cfg: TransformerConfig,
    mb: Batch,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Grid ``[S, T]`` log-probs of each token given the ones before it (0 where unscored), and
    the entropy of the distribution that produced it when ``with_entropy``."""
    ids = mb["input_ids"]
    hidden = _hidden(params, cfg, mb, mesh)
    # Position l scores token l + 1 of the row; the last column's target is a dummy.
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    logp_rl, ent_rl = token_logprobs(
        params,
        cfg,
        hidden,
        targets,
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        mesh=mesh,
    )
    scored = scored_mask(mb["seq_lens"], mb["token_index"].shape[-1])
    logp = jnp.where(scored, rows_to_grid(logp_rl, mb["token_index"], 1), 0.0)
    if ent_rl is None:
        return logp, None
    return logp, jnp.where(scored, rows_to_grid(ent_rl, mb["token_index"], 1), 0.0)


def microbatch_values(
    params: Params, cfg: TransformerConfig, mb: Batch, *, mesh: Mesh | None = None
) -> jax.Array:
    """Grid ``[S, T]`` values: token t's value is the head's output at t − 1 (the state it was
    generated from), as for log-probs; 0 where unscored."""
    values_rl = value_outputs(params, _hidden(params, cfg, mb, mesh, value_head=True))
    scored = scored_mask(mb["seq_lens"], mb["token_index"].shape[-1])
    return jnp.where(scored, rows_to_grid(values_rl, mb["token_index"], 1), 0.0)


def microbatch_scores(
    params: Params, cfg: TransformerConfig, mb: Batch, *, mesh: Mesh | None = None
) -> jax.Array:
    """``[S]`` value-head output at each sequence's last token (reward-model score); 0 for empty
    slots."""
    values_rl = value_outputs(params, _hidden(params, cfg, mb, mesh, value_head=True))
    lens = mb["seq_lens"]
    last = jnp.take_along_axis(mb["token_index"], jnp.maximum(lens - 1, 0)[:, None], axis=1)
    return jnp.where(lens > 0, values_rl.reshape(-1)[last[:, 0]], 0.0)
