"""Cached decoding path of the decoder: decode-layout params, a static KV cache, prefill, decode.

Both steps run `transformer.decoder_layer`, the block the full-sequence forward runs; they differ
from it only in their ``attend``: keys and values are written into the cache and read back from
it. The data layout is chosen so that the decode loop copies nothing per step (XLA otherwise
inserts a transpose of every weight and of the whole cache inside the loop body on CPU):

- layers are unstacked into a tuple and the layer loop is unrolled, so no weight slice is taken
  per step; weights are stored in the compute dtype, so none is cast per step;
- keys are cached as ``[B, K, E, S]`` and values as ``[B, K, S, E]``, the layouts the two attention
  matmuls read without transposing.

A row's prompt is left-aligned in its cache row: slot ``s`` holds the token at RoPE position ``s``,
and the keys a query at position ``p`` may see are the slots ``<= p`` (and ``> p - window`` on a
sliding-window layer). Slots past a row's length hold stale values that are never read.

Shapes: B cache rows, N prefill rows, T prefill length, S cache length, D hidden, H query heads,
K kv heads, E head dim, F mlp, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.sharding import constrain, logical_to_spec
from jaxrlhf.models.transformer import (
    Params,
    attention,
    attention_mask,
    decoder_layer,
    embed_tokens,
    layer_windows,
    lm_logits,
    param_axes,
    rms_norm,
    window_mask,
)

DecodeParams = dict[str, Any]


class KVCache(NamedTuple):
    """Per-layer key and value caches (compute dtype)."""

    k: tuple[jax.Array, ...]  # each [B, K, E, S]
    v: tuple[jax.Array, ...]  # each [B, K, S, E]


# --------------------------------------------------------------------------- parameters


def _decode_axes(cfg: TransformerConfig) -> dict[str, Any]:
    """Logical axes of the decode-layout params: `param_axes` with the layer axis unstacked."""
    axes = param_axes(cfg)
    layer = {name: a[1:] for name, a in axes.pop("layers").items()}
    return axes | {"layers": (layer,) * cfg.num_layers}


def to_decode_params(params: Params, cfg: TransformerConfig) -> DecodeParams:
    """Train-layout params (layer-stacked) -> decode layout (see module docstring)."""
    dtype = jnp.dtype(cfg.compute_dtype)
    out = {name: params[name].astype(dtype) for name in _decode_axes(cfg) if name != "layers"}
    stacked = params["layers"]
    out["layers"] = tuple(
        {name: w[i].astype(dtype) for name, w in stacked.items()} for i in range(cfg.num_layers)
    )
    return out


def decode_param_shardings(cfg: TransformerConfig, mesh: Mesh | None) -> Any:
    """Shardings of `to_decode_params`' output: heads / mlp / vocab over the tensor axis.

    A dimension is split only when its groups divide evenly (q heads go by kv head, so a shard
    holds whole kv groups); weights are replicated over the data axes, so decode needs no
    per-step all-gather.
    """
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, _decode_axes(cfg), is_leaf=_is_axes)
    tensor = mesh.shape.get("tensor", 1)
    K = cfg.num_kv_heads
    # the logical axes that LOGICAL_RULES puts on the tensor axis -> their number of groups
    groups = {"q_heads": K, "kv_heads": K, "mlp": cfg.intermediate_size, "vocab": cfg.vocab_size}

    def sharding(axes: tuple[str, ...]) -> NamedSharding:
        split = lambda a: tensor > 1 and a in groups and groups[a] % tensor == 0
        return NamedSharding(mesh, PartitionSpec(*("tensor" if split(a) else None for a in axes)))

    return jax.tree.map(sharding, _decode_axes(cfg), is_leaf=_is_axes)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


# --------------------------------------------------------------------------- cache


def init_cache(cfg: TransformerConfig, batch: int, length: int) -> KVCache:
    """A zero cache of ``batch`` rows by ``length`` slots."""
    dtype = jnp.dtype(cfg.compute_dtype)
    K, E = cfg.num_kv_heads, cfg.dim_head
    return KVCache(
        k=tuple(jnp.zeros((batch, K, E, length), dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros((batch, K, length, E), dtype) for _ in range(cfg.num_layers)),
    )


def cache_shardings(cfg: TransformerConfig, mesh: Mesh | None, batch: int, length: int) -> KVCache:
    """Rows over the data axes, kv heads over the tensor axis."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return KVCache(k=(device,) * cfg.num_layers, v=(device,) * cfg.num_layers)
    K, E = cfg.num_kv_heads, cfg.dim_head
    axes = ("batch", "kv_heads", None, None)
    k = NamedSharding(mesh, logical_to_spec(axes, (batch, K, E, length), mesh))
    v = NamedSharding(mesh, logical_to_spec(axes, (batch, K, length, E), mesh))
    return KVCache(k=(k,) * cfg.num_layers, v=(v,) * cfg.num_layers)


# --------------------------------------------------------------------------- prefill / decode

# attend(layer index, window, q_bthe, k_btke, v_btke) -> (out_bthe, (layer k cache, v cache))
CacheAttend = Callable[..., tuple[jax.Array, tuple[jax.Array, jax.Array]]]


def _run_layers(
    dp: DecodeParams,
    cfg: TransformerConfig,
    ids_bt: jax.Array,
    positions_bt: jax.Array,
    attend: CacheAttend,
    mesh: Mesh | None,
) -> tuple[jax.Array, KVCache]:
    """Every decoder layer, unrolled; the last hidden states (not final-normed), the new cache."""
    x, cos, sin = embed_tokens(dp, cfg, ids_bt, positions_bt, mesh)
    new_k, new_v = [], []
    for i, (p, window) in enumerate(zip(dp["layers"], layer_windows(cfg).tolist(), strict=True)):
        x, (k, v) = decoder_layer(cfg, p, x, cos, sin, functools.partial(attend, i, window), mesh)
        new_k.append(k)
        new_v.append(v)
    return x, KVCache(k=tuple(new_k), v=tuple(new_v))


def prefill(
    dp: DecodeParams,
    cfg: TransformerConfig,
    cache: KVCache,
    ids_nt: jax.Array,
    lengths_n: jax.Array,
    src_b: jax.Array,
    mesh: Mesh | None = None,
) -> KVCache:
    """Run left-aligned prompts and write their keys/values into cache rows.

    Row ``n`` of ``ids_nt`` holds ``lengths_n[n]`` real tokens then padding. Cache row ``b`` gets
    prefill row ``src_b[b]`` in slots ``[0, T)``; ``src_b[b] = -1`` leaves row ``b`` untouched, so
    one prefill row can feed several cache rows (n samples per prompt). Only the cache is
    returned, so XLA drops the last layer's attention and MLP.
    """
    N, T = ids_nt.shape
    B = src_b.shape[0]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (N, T))
    segments = (positions < lengths_n[:, None]).astype(jnp.int32)
    mask = attention_mask(segments, segments, positions, positions)
    dpos = positions[:, :, None] - positions[:, None, :]
    dest = jnp.where(src_b >= 0, jnp.arange(B), B)  # B is out of range: dropped
    src = jnp.clip(src_b, 0, N - 1)

    def attend(i, window, q, k, v):
        # [N, T, K, E] -> cache layouts, gathered by source row, written into rows `dest`.
        ck = cache.k[i].at[dest, :, :, :T].set(jnp.transpose(k, (0, 2, 3, 1))[src], mode="drop")
        cv = cache.v[i].at[dest, :, :T, :].set(jnp.transpose(v, (0, 2, 1, 3))[src], mode="drop")
        return attention(q, k, v, window_mask(mask, dpos, window)), (ck, cv)

    _, new_cache = _run_layers(dp, cfg, ids_nt, positions, attend, mesh)
    return new_cache


def _write(cache_row: jax.Array, update: jax.Array, pos: jax.Array, axis: int) -> jax.Array:
    """Write one slot of one row (vmapped over rows)."""
    start = [0] * cache_row.ndim
    start[axis] = pos
    return jax.lax.dynamic_update_slice(cache_row, update, start)


def decode_step(
    dp: DecodeParams,
    cfg: TransformerConfig,
    cache: KVCache,
    tokens_b: jax.Array,
    positions_b: jax.Array,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, KVCache]:
    """Feed one token per row at its position; float32 next-token logits `[B, V]`, new cache.

    Each row's key/value is written at slot ``positions_b[b]`` (must be < S) before attending, so
    the token sees itself and every earlier slot of its row.
    """
    S = cache.k[0].shape[-1]
    dpos = positions_b[:, None, None] - jnp.arange(S, dtype=jnp.int32)  # [B, 1, S]
    visible = dpos >= 0
    write_k = jax.vmap(functools.partial(_write, axis=2))  # rows [K, E, S] <- [K, E, 1]
    write_v = jax.vmap(functools.partial(_write, axis=1))  # rows [K, S, E] <- [K, 1, E]

    def attend(i, window, q, k, v):  # k, v [B, 1, K, E]
        ck = write_k(cache.k[i], jnp.moveaxis(k, 1, -1), positions_b)
        cv = write_v(cache.v[i], jnp.swapaxes(v, 1, 2), positions_b)
        mask = window_mask(visible, dpos, window)
        return attention(q, ck, cv, mask, k_axes="bkes", v_axes="bkse"), (ck, cv)

    x, new_cache = _run_layers(dp, cfg, tokens_b[:, None], positions_b[:, None], attend, mesh)
    h = rms_norm(x, dp["final_norm"], cfg.rms_norm_eps)
    logits = constrain(lm_logits(dp, cfg, h)[:, 0], mesh, ("batch", "act_vocab"))
    return logits, new_cache
