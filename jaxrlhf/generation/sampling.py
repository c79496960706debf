"""Token sampling from logits: greedy, temperature, top-k, top-p, banned ids; pure functions.

Two log-probabilities come back for every sampled token:

- ``logprobs``: under the full softmax of ``logits / temperature`` (``logits`` for greedy rows).
  This is the quantity the trainer recomputes with a teacher-forced forward pass, so it is the
  behaviour log-prob the (decoupled) PPO loss uses: its ratio to the proximal policy measures only
  policy staleness (exactly 1 on-policy), not the truncation.
- ``sampled_logprobs``: under the distribution really sampled from, i.e. after top-k / top-p and
  the stop-token ban of ``min_new_tokens``, renormalised. It equals ``logprobs`` when nothing is
  truncated; it is the exact importance-sampling denominator only for a trainer that applies the
  same truncation, and otherwise a diagnostic.

Everything here is written for the decode loop's budget on CPU, where a full vocabulary sort or a
Gumbel variable per vocabulary entry costs more than the model step: sampling draws one uniform
per row and inverts a two-level (blocked) CDF; top-k / top-p thresholds come from the
`lax.top_k` candidates when the kept set lies among them (the usual case) and from an exact
bisection over the float ordering otherwise. The uniform comes from the row's key folded with its
token index, so a request's samples do not depend on batching.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Mode = Literal["greedy", "sample", "filtered"]
MODES: tuple[Mode, ...] = ("greedy", "sample", "filtered")
TOP_CANDIDATES = 64  # lax.top_k width used to find top-k / top-p thresholds
BLOCK = 128  # inner block of the two-level argmax and CDF


def _blocks(x_bv: jax.Array, fill: float) -> jax.Array:
    """`[B, V]` -> `[B, V / BLOCK, BLOCK]`, padding the vocabulary with ``fill``."""
    B, V = x_bv.shape
    blk = min(BLOCK, V)
    nb = -(-V // blk)
    if nb * blk != V:
        x_bv = jnp.pad(x_bv, ((0, 0), (0, nb * blk - V)), constant_values=fill)
    return x_bv.reshape(B, nb, blk)


def _max_argmax(x_bv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row max and its first index, two-level: XLA's argmax reduces (value, index) pairs slowly."""
    blocks = _blocks(x_bv, -jnp.inf)
    block_max = jnp.max(blocks, axis=-1)  # [B, nb]
    j = jnp.argmax(block_max, axis=-1)
    inner = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]
    i = jnp.argmax(inner, axis=-1)
    return jnp.max(block_max, axis=-1), (j * blocks.shape[-1] + i).astype(jnp.int32)


def _logsumexp(x_bv: jax.Array, m_b: jax.Array) -> jax.Array:
    return m_b + jnp.log(jnp.sum(jnp.exp(x_bv - m_b[:, None]), axis=-1))


def _take(x_bv: jax.Array, idx_b: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_bv, idx_b[:, None], axis=-1)[:, 0]


def ban_tokens(logits_bv: jax.Array, banned_bn: jax.Array, active_b: jax.Array) -> jax.Array:
    """Set ``logits[b, banned[b, j]]`` to -inf where ``active_b[b]``; out-of-range ids: padding."""
    B, V = logits_bv.shape
    ids = jnp.where(active_b[:, None], banned_bn, V)
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], ids.shape)
    return logits_bv.at[rows, ids].set(-jnp.inf, mode="drop")


# --------------------------------------------------------------------------- top-k / top-p


def _sortable(x: jax.Array) -> jax.Array:
    """int32 keys with the order of the float32 values (-inf lowest)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _bisect_keep(x_bv: jax.Array, weight_bv: jax.Array, target_b: jax.Array) -> jax.Array:
    """Exact mask ``x >= tau`` for the largest tau with ``sum(weight[x >= tau]) >= target``."""
    keys = _sortable(x_bv)
    lo = jnp.full(x_bv.shape[:1], jnp.iinfo(jnp.int32).min, jnp.int32)  # always satisfied
    hi = jnp.max(keys, axis=-1) + 1  # never satisfied (target > 0)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        ok = jnp.sum(jnp.where(keys >= mid[:, None], weight_bv, 0), axis=-1) >= target_b
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 33, body, (lo, hi))
    return keys >= lo[:, None]


def top_k_top_p_mask(x_bv: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """Boolean `[B, V]` of the tokens kept by top-k (0 = off) then top-p (1 = off), HF's order.

    Top-p keeps the fewest most probable tokens (of the top-k-restricted softmax) whose mass
    reaches ``top_p``. Ties with the last kept value are kept, as HF's value-threshold warpers do.
    """
    V = x_bv.shape[-1]
    C = min(TOP_CANDIDATES, V)
    # The barrier keeps the fast top-k kernel: when its result feeds a fusion, XLA:CPU rewrites
    # top_k into a full sort of the vocabulary (~100x slower at V = 32k).
    vals = jax.lax.optimization_barrier(jax.lax.top_k(x_bv, C)[0])  # [B, C], descending
    k_on = (top_k_b > 0) & (top_k_b < V)
    k_inside = top_k_b <= C
    kth = jnp.take_along_axis(vals, jnp.clip(top_k_b - 1, 0, C - 1)[:, None], axis=-1)
    keep_k = x_bv >= kth

    def k_fallback():
        return _bisect_keep(x_bv, jnp.ones_like(x_bv), top_k_b.astype(x_bv.dtype))

    needs_k = k_on & ~k_inside
    keep_k = jax.lax.cond(
        jnp.any(needs_k), lambda: jnp.where(needs_k[:, None], k_fallback(), keep_k), lambda: keep_k
    )
    keep_k = keep_k | ~k_on[:, None]

    # top-p on the top-k-restricted distribution
    xk = jnp.where(keep_k, x_bv, -jnp.inf)
    m = vals[:, 0]
    probs = jnp.exp(xk - m[:, None])
    z = jnp.sum(probs, axis=-1)
    cand = jnp.where(
        vals >= jnp.min(jnp.where(keep_k, x_bv, jnp.inf), -1, keepdims=True), vals, -jnp.inf
    )
    pc = jnp.exp(cand - m[:, None]) / z[:, None]
    before = jnp.cumsum(pc, axis=-1) - pc
    count = jnp.sum(before < top_p_b[:, None], axis=-1)
    p_on = top_p_b < 1.0
    inside = (count < C) | (jnp.sum(pc, axis=-1) >= top_p_b)
    threshold = jnp.take_along_axis(vals, jnp.clip(count - 1, 0, C - 1)[:, None], axis=-1)
    keep_p = xk >= threshold

    def p_fallback():
        return _bisect_keep(xk, probs, top_p_b * z)

    needs_p = p_on & ~inside
    keep_p = jax.lax.cond(
        jnp.any(needs_p), lambda: jnp.where(needs_p[:, None], p_fallback(), keep_p), lambda: keep_p
    )
    return keep_k & (keep_p | ~p_on[:, None])


# --------------------------------------------------------------------------- sampling


def inverse_cdf_sample(x_bv: jax.Array, m_b: jax.Array, uniform_b: jax.Array) -> jax.Array:
    """Index drawn from softmax(x) at ``uniform_b`` in [0, 1), via a two-level blocked CDF.

    ``m_b`` is the row max. Zero-probability tokens are never returned: the chosen block has
    positive mass and the index is clamped to the block's last positive entry.
    """
    probs = _blocks(jnp.exp(x_bv - m_b[:, None]), 0.0)
    nb, blk = probs.shape[1:]
    block_mass = jnp.sum(probs, axis=-1)  # [B, nb]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = uniform_b * block_cdf[:, -1]
    iota_nb = jnp.arange(nb)[None, :]
    last_block = jnp.max(jnp.where(block_mass > 0, iota_nb, 0), axis=-1)
    j = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), last_block)
    inner = jnp.take_along_axis(probs, j[:, None, None], axis=1)[:, 0]  # [B, blk]
    offset = _take(block_cdf, j) - _take(block_mass, j)
    cdf = offset[:, None] + jnp.cumsum(inner, axis=-1)
    iota_blk = jnp.arange(blk)[None, :]
    last = jnp.max(jnp.where(inner > 0, iota_blk, 0), axis=-1)
    i = jnp.minimum(jnp.sum(cdf <= target[:, None], axis=-1), last)
    return (j * blk + i).astype(jnp.int32)


def _choose(x_bv, greedy_b, uniform_b, mode):
    """(token, x[token], logsumexp(x)) sampling from softmax(x) (argmax on greedy rows)."""
    m, arg = _max_argmax(x_bv)
    tokens = arg
    if mode != "greedy":
        tokens = jnp.where(greedy_b, arg, inverse_cdf_sample(x_bv, m, uniform_b))
    return tokens.astype(jnp.int32), _take(x_bv, tokens), _logsumexp(x_bv, m)


def sample_tokens(
    logits_bv: jax.Array,
    temperature_b: jax.Array,
    top_k_b: jax.Array,
    top_p_b: jax.Array,
    uniform_b: jax.Array,
    banned_bn: jax.Array | None = None,
    ban_b: jax.Array | None = None,
    *,
    mode: Mode = "filtered",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, logprobs, sampled_logprobs), each `[B]`; see the module docstring.

    Rows with ``temperature_b == 0`` are greedy in every mode. ``mode`` (static) drops work no row
    needs: "greedy" when all rows are greedy, "sample" when no row uses top-k / top-p.
    ``banned_bn`` ids are excluded on rows where ``ban_b`` (the ``min_new_tokens`` stop ban).
    """
    logits_bv = logits_bv.astype(jnp.float32)
    greedy_b = temperature_b <= 0
    scaled = logits_bv
    if mode != "greedy":
        scaled = logits_bv / jnp.where(greedy_b, 1.0, temperature_b)[:, None]

    def draw(x):
        if mode == "filtered":
            keep = top_k_top_p_mask(x, top_k_b, top_p_b) | greedy_b[:, None]
            x = jnp.where(keep, x, -jnp.inf)
        return _choose(x, greedy_b, uniform_b, mode)

    def unbanned():
        tokens, picked, lse = draw(scaled)
        if mode == "filtered":
            logz = _logsumexp(scaled, jnp.max(scaled, axis=-1))
            return tokens, _take(scaled, tokens) - logz, picked - lse
        return tokens, picked - lse, picked - lse  # nothing truncated: one softmax

    def banned():
        tokens, picked, lse = draw(ban_tokens(scaled, banned_bn, ban_b))
        logz = _logsumexp(scaled, jnp.max(scaled, axis=-1))
        return tokens, _take(scaled, tokens) - logz, picked - lse

    if banned_bn is None:
        return unbanned()
    return jax.lax.cond(jnp.any(ban_b), banned, unbanned)


def row_uniforms(keys_b2: jax.Array, counters_b: jax.Array) -> jax.Array:
    """One uniform in [0, 1) per row from its raw key data folded with its token counter."""

    def one(key_data, counter):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), counter)
        return jax.random.uniform(key, (), jnp.float32)

    return jax.vmap(one)(keys_b2, counters_b)
