"""Cached decoding path of the decoder: decode-layout params, a static KV cache, prefill, decode.

The math is `transformer.py`'s; only the data layout differs, chosen so that the decode loop
copies nothing per step (XLA otherwise inserts a transpose of every weight and of the whole cache
inside the loop body on CPU):

- layers are unstacked into a tuple and the layer loop is unrolled, so no weight slice is taken
  per step; weights are stored in the compute dtype, so none is cast per step;
- q/k/v are fused into one ``[D, K, G+2, E]`` matrix and gate/up into ``[D, 2, F]``, contraction
  dimension first (one matmul each, the layout the CPU matmul reads directly);
- keys are cached as ``[B, K, E, S]`` and values as ``[B, K, S, E]``, the layouts the two attention
  matmuls read without transposing.

A row's prompt is left-aligned in its cache row: slot ``s`` holds the token at RoPE position ``s``,
and the keys a query at position ``p`` may see are the slots ``<= p`` (and ``> p - window`` on a
sliding-window layer). Slots past a row's length hold stale values that are never read.

Shapes: B cache rows, N prefill rows, T prefill length, S cache length, D hidden, K kv heads,
G = H / K, E head dim, F mlp, V vocab.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.rope import apply_rope, inverse_frequencies, rope_tables
from jaxrlhf.models.sharding import constrain, logical_to_spec
from jaxrlhf.models.transformer import (
    Params,
    _windows,
    attention,
    attention_mask,
    rms_norm,
)

DecodeParams = dict[str, Any]
_NEG = -1e30  # finite: a fully masked row must not produce NaN


class KVCache(NamedTuple):
    """Per-layer key and value caches (compute dtype)."""

    k: tuple[jax.Array, ...]  # each [B, K, E, S]
    v: tuple[jax.Array, ...]  # each [B, K, S, E]


# --------------------------------------------------------------------------- parameters


def to_decode_params(params: Params, cfg: TransformerConfig) -> DecodeParams:
    """Train-layout params (layer-stacked) -> decode layout (see module docstring)."""
    dtype = jnp.dtype(cfg.compute_dtype)
    K, G, E = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.dim_head
    cast = lambda a: a.astype(dtype)
    stacked = params["layers"]
    layers = []
    for i in range(cfg.num_layers):
        p = {name: w[i] for name, w in stacked.items()}
        D = p["q"].shape[0]
        # q heads h = k * G + g use kv head k (HF's repeat_kv order): fuse per kv head, so that
        # splitting the fused axis over the tensor mesh axis keeps whole kv groups together.
        q = p["q"].reshape(D, K, G, E)
        qkv = jnp.concatenate([q, p["k"][:, :, None], p["v"][:, :, None]], axis=2)
        layer = {
            "input_norm": cast(p["input_norm"]),
            "post_norm": cast(p["post_norm"]),
            "qkv": cast(qkv.reshape(D, K * (G + 2) * E)),
            "o": cast(p["o"].reshape(K * G * E, D)),
            # gate and up interleaved per mlp unit, so a tensor shard holds both halves.
            "gate_up": cast(jnp.stack([p["gate"], p["up"]], axis=2).reshape(D, -1)),
            "down": cast(p["down"]),
        }
        if cfg.qkv_bias:
            qb = p["q_bias"].reshape(K, G, E)
            qkv_b = jnp.concatenate([qb, p["k_bias"][:, None], p["v_bias"][:, None]], axis=1)
            layer["qkv_bias"] = cast(qkv_b.reshape(-1))
        if cfg.o_bias:
            layer["o_bias"] = cast(p["o_bias"])
        if cfg.mlp_bias:
            layer["gate_up_bias"] = cast(jnp.stack([p["gate_bias"], p["up_bias"]], 1).reshape(-1))
            layer["down_bias"] = cast(p["down_bias"])
        if cfg.qk_norm:
            layer["q_norm"] = cast(p["q_norm"])
            layer["k_norm"] = cast(p["k_norm"])
        layers.append(layer)
    out = {"embed": cast(params["embed"]), "final_norm": cast(params["final_norm"])}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = cast(params["lm_head"])
    out["layers"] = tuple(layers)
    return out


def _tensor_dims(cfg: TransformerConfig) -> dict[str, tuple[int, int]]:
    """Leaf name -> (dimension split over the tensor axis, number of whole groups in it)."""
    K, F, V = cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size
    return {
        "qkv": (1, K), "qkv_bias": (0, K), "o": (0, K),
        "gate_up": (1, F), "gate_up_bias": (0, F), "down": (0, F),
        "embed": (0, V), "lm_head": (1, V),
    }  # fmt: skip


def decode_param_shardings(cfg: TransformerConfig, mesh: Mesh | None) -> Any:
    """Shardings of `to_decode_params`' output: kv groups / mlp / vocab over the tensor axis.

    A dimension is split only when its groups (kv heads, mlp units, vocab) divide evenly; weights
    are replicated over the data axes, so decode needs no per-step all-gather.
    """
    shapes = jax.eval_shape(lambda p: to_decode_params(p, cfg), _abstract_params(cfg))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, shapes)
    tensor = mesh.shape.get("tensor", 1)
    dims = _tensor_dims(cfg)

    def sharding(path, leaf):
        spec = [None] * leaf.ndim
        dim, groups = dims.get(getattr(path[-1], "key", None), (None, 0))
        if dim is not None and tensor > 1 and groups % tensor == 0:
            spec[dim] = "tensor"
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    return jax.tree_util.tree_map_with_path(sharding, shapes)


def _abstract_params(cfg: TransformerConfig) -> Params:
    from jaxrlhf.models.transformer import param_shapes

    shapes = param_shapes(cfg)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(cfg.param_dtype)),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


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
    k = jax.sharding.NamedSharding(mesh, logical_to_spec(axes, (batch, K, E, length), mesh))
    v = jax.sharding.NamedSharding(mesh, logical_to_spec(axes, (batch, K, length, E), mesh))
    return KVCache(k=(k,) * cfg.num_layers, v=(v,) * cfg.num_layers)


# --------------------------------------------------------------------------- building blocks


def _qkv(cfg: TransformerConfig, p: dict, h: jax.Array):
    """Fused projection of ``h [..., D]``: q [..., K, G, E], k and v [..., K, E], q/k-normed."""
    K, E = cfg.num_kv_heads, cfg.dim_head
    G = cfg.num_heads // K
    qkv = h @ p["qkv"]
    if "qkv_bias" in p:
        qkv = qkv + p["qkv_bias"]
    qkv = qkv.reshape(*h.shape[:-1], K, G + 2, E)
    q, k, v = qkv[..., :G, :], qkv[..., G, :], qkv[..., G + 1, :]
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    return q, k, v


def _mlp(cfg: TransformerConfig, p: dict, x: jax.Array, mesh: Mesh | None, act_axes) -> jax.Array:
    h = rms_norm(x, p["post_norm"], cfg.rms_norm_eps)
    gu = h @ p["gate_up"]
    if "gate_up_bias" in p:
        gu = gu + p["gate_up_bias"]
    gu = gu.reshape(*gu.shape[:-1], -1, 2)
    act = constrain(jax.nn.silu(gu[..., 0]) * gu[..., 1], mesh, act_axes)
    out = act @ p["down"]
    return x + (out + p["down_bias"] if "down_bias" in p else out)


def _attn_out(p: dict, o: jax.Array) -> jax.Array:
    """``o [..., K, G, E]`` -> ``[..., D]``."""
    out = o.reshape(*o.shape[:-3], -1) @ p["o"]
    return out + p["o_bias"] if "o_bias" in p else out


def _logits(dp: DecodeParams, cfg: TransformerConfig, h: jax.Array) -> jax.Array:
    if cfg.tie_word_embeddings:
        return jnp.einsum("bd,vd->bv", h, dp["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("bd,dv->bv", h, dp["lm_head"], preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------- prefill / decode


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
    one prefill row can feed several cache rows (n samples per prompt).
    """
    N, T = ids_nt.shape
    B = src_b.shape[0]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (N, T))
    segments = (positions < lengths_n[:, None]).astype(jnp.int32)
    mask = attention_mask(segments, segments, positions, positions)
    dpos = positions[:, :, None] - positions[:, None, :]
    inv_freq = inverse_frequencies(cfg.rope, cfg.dim_head, cfg.max_position_embeddings)
    cos, sin = rope_tables(positions, inv_freq)
    dest = jnp.where(src_b >= 0, jnp.arange(B), B)  # B is out of range: dropped
    src = jnp.clip(src_b, 0, N - 1)
    x = constrain(dp["embed"][ids_nt], mesh, ("batch", "seq", "act_embed"))
    new_k, new_v = [], []
    windows = _windows(cfg)
    for i, p in enumerate(dp["layers"]):
        h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
        q, k, v = _qkv(cfg, p, h)
        k = apply_rope(k, cos, sin)
        # [N, T, K, E] -> cache layouts, gathered by source row, written into rows `dest`.
        k_rows = jnp.transpose(k, (0, 2, 3, 1))[src]
        v_rows = jnp.transpose(v, (0, 2, 1, 3))[src]
        new_k.append(cache.k[i].at[dest, :, :, :T].set(k_rows, mode="drop"))
        new_v.append(cache.v[i].at[dest, :, :T, :].set(v_rows, mode="drop"))
        if i == cfg.num_layers - 1:
            break  # the last layer's output is not needed: decode reads only the cache
        Nq, Tq, K, G, E = q.shape
        q = apply_rope(q.reshape(Nq, Tq, K * G, E), cos, sin)
        q = constrain(q, mesh, ("batch", "seq", "act_heads", None))
        layer_mask = mask if windows[i] == 0 else mask & (dpos < int(windows[i]))
        o = attention(q, k, v, layer_mask).reshape(Nq, Tq, K, G, E)
        x = x + _attn_out(p, o)
        x = _mlp(cfg, p, x, mesh, ("batch", "seq", "act_mlp"))
        x = constrain(x, mesh, ("batch", "seq", "act_embed"))
    return KVCache(k=tuple(new_k), v=tuple(new_v))


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
    E = cfg.dim_head
    inv_freq = inverse_frequencies(cfg.rope, E, cfg.max_position_embeddings)
    cos, sin = rope_tables(positions_b[:, None], inv_freq)  # [B, 1, E]
    slots = jnp.arange(S, dtype=jnp.int32)[None, :]
    visible = slots <= positions_b[:, None]  # [B, S]
    write_k = jax.vmap(lambda c, u, p: _write(c, u[:, :, None], p, 2))
    write_v = jax.vmap(lambda c, u, p: _write(c, u[:, None, :], p, 1))
    x = constrain(dp["embed"][tokens_b], mesh, ("batch", "act_embed"))
    new_k, new_v = [], []
    windows = _windows(cfg)
    for i, p in enumerate(dp["layers"]):
        h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
        q, k, v = _qkv(cfg, p, h)  # q [B, K, G, E], k/v [B, K, E]
        q = apply_rope(q, cos, sin)  # K plays the role of T in apply_rope's [B, T, H, E]
        k = apply_rope(k[:, :, None], cos, sin)[:, :, 0]
        ck = write_k(cache.k[i], k, positions_b)
        cv = write_v(cache.v[i], v, positions_b)
        new_k.append(ck)
        new_v.append(cv)
        scores = jnp.einsum("bkge,bkes->bkgs", q, ck, preferred_element_type=jnp.float32)
        keep = visible
        if windows[i]:
            keep = keep & (positions_b[:, None] - slots < int(windows[i]))
        scores = jnp.where(keep[:, None, None, :], scores * (E**-0.5), _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(cv.dtype)
        o = jnp.einsum("bkgs,bkse->bkge", probs, cv)
        x = x + _attn_out(p, o)
        x = _mlp(cfg, p, x, mesh, ("batch", "act_mlp"))
        x = constrain(x, mesh, ("batch", "act_embed"))
    h = rms_norm(x, dp["final_norm"], cfg.rms_norm_eps)
    logits = constrain(_logits(dp, cfg, h), mesh, ("batch", "act_vocab"))
    return logits, KVCache(k=tuple(new_k), v=tuple(new_v))
