"""Pure-function decoder-only transformer (Llama / Qwen2 / Qwen3 / Mistral families).

Parameters are a plain dict pytree; the layers are stacked on a leading axis and run with
`lax.scan`, so compile time does not grow with depth. Attention is restricted by
``segment_ids`` (0 = padding; packed sequences get 1, 2, ...) and causal order; ``positions``
are per token, so left padding and packing both reduce to the same code path. `decoder_layer`
is the one block both this forward and the KV-cache path (`kv_cache.py`) run; they differ only in
the ``attend`` they give it: where keys and values come from and which of them each query sees.

Shapes: B batch, T query length, S key length, D hidden, H query heads, K kv heads,
G = H / K, E head dim, F mlp, V vocab, L layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.rope import apply_rope, inverse_frequencies, rope_tables
from jaxrlhf.models.sharding import constrain

Params = dict[str, Any]
_NEG = float(np.finfo(np.float32).min)


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


# --------------------------------------------------------------------------- parameters


def param_axes(cfg: TransformerConfig, *, lm_head: bool = True, value_head: bool = False) -> dict:
    """Logical axes of every parameter; the same tree structure as `init_params`."""
    layers: dict[str, tuple] = {
        "input_norm": ("layers", "norm"),
        "q": ("layers", "embed", "q_heads", "head_dim"),
        "k": ("layers", "embed", "kv_heads", "head_dim"),
        "v": ("layers", "embed", "kv_heads", "head_dim"),
        "o": ("layers", "q_heads", "head_dim", "embed"),
        "post_norm": ("layers", "norm"),
        "gate": ("layers", "embed", "mlp"),
        "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
    }
    if cfg.qkv_bias:
        layers |= {
            "q_bias": ("layers", "q_heads", "head_dim"),
            "k_bias": ("layers", "kv_heads", "head_dim"),
            "v_bias": ("layers", "kv_heads", "head_dim"),
        }
    if cfg.o_bias:
        layers["o_bias"] = ("layers", "norm")
    if cfg.mlp_bias:
        layers |= {
            "gate_bias": ("layers", "mlp"),
            "up_bias": ("layers", "mlp"),
            "down_bias": ("layers", "norm"),
        }
    if cfg.qk_norm:
        layers |= {"q_norm": ("layers", "head_dim"), "k_norm": ("layers", "head_dim")}
    axes: dict[str, Any] = {
        "embed": ("vocab", "embed"),
        "layers": layers,
        "final_norm": ("norm",),
    }
    if lm_head and not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    if value_head:
        axes["value_head"] = {"kernel": ("norm",), "bias": ()}
    return axes


def param_shapes(cfg: TransformerConfig, *, lm_head: bool = True, value_head: bool = False) -> dict:
    """Shapes of every parameter, matching `param_axes`."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.dim_head
    size = {
        "layers": L, "embed": D, "norm": D, "mlp": F, "vocab": V,
        "q_heads": H, "kv_heads": K, "head_dim": E,
    }  # fmt: skip
    axes = param_axes(cfg, lm_head=lm_head, value_head=value_head)
    shapes = jax.tree.map(
        lambda a: tuple(size[n] for n in a),
        axes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    # head_dim-sized norms: "norm" defaulted to D above, fix the q/k norms.
    if cfg.qk_norm:
        shapes["layers"]["q_norm"] = (L, E)
        shapes["layers"]["k_norm"] = (L, E)
    return shapes


def init_params(
    cfg: TransformerConfig, rng: jax.Array, *, lm_head: bool = True, value_head: bool = False
) -> Params:
    """Random parameters as HF initialises them: N(0, initializer_range), norms 1, biases 0."""
    shapes = param_shapes(cfg, lm_head=lm_head, value_head=value_head)
    flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(rng, len(flat))
    dtype = _dtype(cfg.param_dtype)
    leaves = []
    for key, (path, shape) in zip(keys, flat, strict=True):
        name = str(path[-1].key)
        if name.endswith("norm"):
            leaf = jnp.ones(shape, dtype)
        elif name.endswith("bias"):
            leaf = jnp.zeros(shape, dtype)
        else:
            leaf = (cfg.initializer_range * jax.random.normal(key, shape)).astype(dtype)
        leaves.append(leaf)
    return jax.tree.unflatten(treedef, leaves)


# --------------------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back, then scaled (HF's order of operations)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def attention_mask(
    q_segment_bt: jax.Array,
    k_segment_bs: jax.Array,
    q_index_bt: jax.Array,
    k_index_bs: jax.Array,
) -> jax.Array:
    """Boolean `[B, T, S]`: same non-padding segment and key not after the query."""
    same = (q_segment_bt[:, :, None] == k_segment_bs[:, None, :]) & (k_segment_bs[:, None, :] > 0)
    causal = k_index_bs[:, None, :] <= q_index_bt[:, :, None]
    return same & causal


def window_mask(mask_bts: jax.Array, dpos_bts: jax.Array, window: jax.Array | int) -> jax.Array:
    """``mask_bts`` less the keys ``window`` or more positions before the query (0 = no window)."""
    return mask_bts & ((window == 0) | (dpos_bts < window))


def attention(
    q_bthe: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask_bts: jax.Array,
    *,
    k_axes: str = "bske",
    v_axes: str = "bske",
) -> jax.Array:
    """Grouped-query attention with a boolean mask; softmax in float32.

    ``k_axes`` / ``v_axes`` name the key and value layouts (the KV cache stores keys as
    ``bkes`` and values as ``bkse``). Query rows with no allowed key (padding) get a uniform
    distribution instead of NaN; their outputs are never used.
    """
    B, T, H, E = q_bthe.shape
    K = k.shape[k_axes.index("k")]
    q = q_bthe.reshape(B, T, K, H // K, E)
    scores = jnp.einsum(f"btkge,{k_axes}->bktgs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (E**-0.5)
    scores = jnp.where(mask_bts[:, None, :, None, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bktgs,{v_axes}->bktge", probs, v)
    return jnp.swapaxes(out, 1, 2).reshape(B, T, H, E)


def _dense(x: jax.Array, w: jax.Array, spec: str, bias: jax.Array | None = None) -> jax.Array:
    y = jnp.einsum(spec, x, w)
    return y if bias is None else y + bias


Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def decoder_layer(
    cfg: TransformerConfig,
    p: Params,
    x_btd: jax.Array,
    cos_bte: jax.Array,
    sin_bte: jax.Array,
    attend: Attend,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Any]:
    """One pre-norm decoder block on one layer's params ``p`` (compute dtype, no layer axis).

    ``attend(q_bthe, k_btke, v_btke) -> (out_bthe, aux)`` says where keys and values come from
    and which of them each query sees: the current sequence (`hidden_states`) or a KV cache that
    it updates (`kv_cache`); ``aux`` (e.g. the updated cache) is returned with the new ``x``.
    """
    eps = cfg.rms_norm_eps
    h = rms_norm(x_btd, p["input_norm"], eps)
    q = _dense(h, p["q"], "btd,dhe->bthe", p.get("q_bias"))
    k = _dense(h, p["k"], "btd,dke->btke", p.get("k_bias"))
    v = _dense(h, p["v"], "btd,dke->btke", p.get("v_bias"))
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], eps)
        k = rms_norm(k, p["k_norm"], eps)
    q = constrain(apply_rope(q, cos_bte, sin_bte), mesh, ("batch", "seq", "act_heads", None))
    k = constrain(apply_rope(k, cos_bte, sin_bte), mesh, ("batch", "seq", "act_heads", None))
    attn_bthe, aux = attend(q, k, v)
    # (h, e) merged into one contraction axis n in memory order: einsum would contract e before
    # h and transpose the weight on every call.
    B, T, H, E = attn_bthe.shape
    o_nd = p["o"].reshape(H * E, -1)
    x_btd = x_btd + _dense(attn_bthe.reshape(B, T, H * E), o_nd, "btn,nd->btd", p.get("o_bias"))
    x_btd = constrain(x_btd, mesh, ("batch", "seq", "act_embed"))
    h = rms_norm(x_btd, p["post_norm"], eps)
    gate = _dense(h, p["gate"], "btd,df->btf", p.get("gate_bias"))
    up = _dense(h, p["up"], "btd,df->btf", p.get("up_bias"))
    act = constrain(jax.nn.silu(gate) * up, mesh, ("batch", "seq", "act_mlp"))
    x_btd = x_btd + _dense(act, p["down"], "btf,fd->btd", p.get("down_bias"))
    return constrain(x_btd, mesh, ("batch", "seq", "act_embed")), aux


def layer_windows(cfg: TransformerConfig) -> np.ndarray:
    """Per-layer sliding window `[L]` (int32; 0 = full attention)."""
    return np.asarray([w or 0 for w in (cfg.sliding_windows or (None,) * cfg.num_layers)], np.int32)


def embed_tokens(
    p: Params,
    cfg: TransformerConfig,
    ids_bt: jax.Array,
    positions_bt: jax.Array,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Input embeddings `[B, T, D]` and the RoPE cos / sin tables `[B, T, E]` of their positions."""
    x = constrain(p["embed"][ids_bt], mesh, ("batch", "seq", "act_embed"))
    inv_freq = inverse_frequencies(cfg.rope, cfg.dim_head, cfg.max_position_embeddings)
    cos, sin = rope_tables(positions_bt, inv_freq)
    return x, cos, sin


# --------------------------------------------------------------------------- forward


def hidden_states(
    params: Params,
    cfg: TransformerConfig,
    input_ids_bt: jax.Array,
    positions_bt: jax.Array,
    segment_ids_bt: jax.Array,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Final-normed hidden states `[B, T, D]` in the compute dtype.

    ``positions_bt`` are RoPE positions (from each sequence's first real token);
    ``segment_ids_bt`` are 0 at padding and equal within one sequence (packing: 1, 2, ...).
    """
    if input_ids_bt.ndim != 2 or not (
        input_ids_bt.shape == positions_bt.shape == segment_ids_bt.shape
    ):
        raise ValueError(
            f"input_ids {input_ids_bt.shape}, positions {positions_bt.shape} and segment_ids "
            f"{segment_ids_bt.shape} must all be [batch, seq]."
        )
    compute = _dtype(cfg.compute_dtype)
    p = jax.tree.map(lambda a: a.astype(compute), params)
    x, cos, sin = embed_tokens(p, cfg, input_ids_bt, positions_bt, mesh)
    index = jnp.broadcast_to(jnp.arange(input_ids_bt.shape[1]), input_ids_bt.shape)
    mask = attention_mask(segment_ids_bt, segment_ids_bt, index, index)
    dpos = positions_bt[:, :, None] - positions_bt[:, None, :]

    def body(x_btd, xs):
        layer, window = xs
        attend = lambda q, k, v: (attention(q, k, v, window_mask(mask, dpos, window)), None)
        return decoder_layer(cfg, layer, x_btd, cos, sin, attend, mesh)

    if cfg.remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    x, _ = jax.lax.scan(body, x, (p["layers"], jnp.asarray(layer_windows(cfg))))
    return rms_norm(x, p["final_norm"], cfg.rms_norm_eps)


def lm_logits(params: Params, cfg: TransformerConfig, hidden_btd: jax.Array) -> jax.Array:
    """Float32 logits `[B, T, V]` from final hidden states (tied or untied head)."""
    compute = _dtype(cfg.compute_dtype)
    if cfg.tie_word_embeddings:
        w = params["embed"].astype(compute)
        return jnp.einsum("btd,vd->btv", hidden_btd, w, preferred_element_type=jnp.float32)
    w = params["lm_head"].astype(compute)
    return jnp.einsum("btd,dv->btv", hidden_btd, w, preferred_element_type=jnp.float32)


def value_outputs(params: Params, hidden_btd: jax.Array) -> jax.Array:
    """Scalar per-token values / rewards `[B, T]` (float32) from the value head."""
    head = params["value_head"]
    h = hidden_btd.astype(jnp.float32)
    return h @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def positions_from_mask(attention_mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(positions, segment_ids) for a (left- or right-) padded batch, as HF `generate` counts.

    Positions count from each row's first real token; padding gets position 0, segment 0.
    """
    mask = attention_mask_bt.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    return positions * mask, mask


def forward_logits(
    params: Params,
    cfg: TransformerConfig,
    input_ids_bt: jax.Array,
    attention_mask_bt: jax.Array,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Float32 logits `[B, T, V]` of a padded batch (1 = real token, 0 = padding)."""
    positions, segments = positions_from_mask(attention_mask_bt)
    hidden = hidden_states(params, cfg, input_ids_bt, positions, segments, mesh)
    logits = lm_logits(params, cfg, hidden)
    return constrain(logits, mesh, ("batch", "seq", "act_vocab"))


# --------------------------------------------------------------------------- token log-probs


def token_logprobs(
    params: Params,
    cfg: TransformerConfig,
    hidden_btd: jax.Array,
    targets_bt: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Log-prob of ``targets_bt[b, t]`` under the logits at position t, float32 ``[B, T]``.

    Pass ``targets_bt`` = the input ids shifted left by one to score each next token. Logits are
    divided by ``temperature``. With ``chunk_size`` the sequence is processed in chunks under
    `jax.checkpoint`, so only ``[B, chunk, V]`` float32 logits are live at a time, forward and
    backward. Also returns the entropy of each position's distribution when ``with_entropy``.
    """
    if targets_bt.shape != hidden_btd.shape[:2]:
        raise ValueError(
            f"targets {targets_bt.shape} must match the leading axes of hidden {hidden_btd.shape}."
        )

    def score(h_btd: jax.Array, y_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = constrain(lm_logits(params, cfg, h_btd), mesh, ("batch", "seq", "act_vocab"))
        if temperature != 1.0:
            logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, y_bt[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return logp, jnp.zeros_like(logp)
        probs = jnp.exp(logits - lse[..., None])
        return logp, lse - jnp.sum(probs * logits, axis=-1)

    B, T, D = hidden_btd.shape
    if chunk_size is None or chunk_size >= T:
        logp, entropy = score(hidden_btd, targets_bt)
    else:
        n = -(-T // chunk_size)
        pad = n * chunk_size - T
        h = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk_size, D)
        y = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(B, n, chunk_size)
        chunked = jax.checkpoint(lambda xs: score(*xs))
        logp, entropy = jax.lax.map(chunked, (jnp.swapaxes(h, 0, 1), jnp.swapaxes(y, 0, 1)))
        logp = jnp.swapaxes(logp, 0, 1).reshape(B, n * chunk_size)[:, :T]
        entropy = jnp.swapaxes(entropy, 0, 1).reshape(B, n * chunk_size)[:, :T]
    return logp, entropy if with_entropy else None
