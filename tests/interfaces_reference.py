"""Independent references for the interface tests: a plain right-padded batch, one forward over
all of it (the model's padded path), the next-token shift written out with explicit loops, and
the whole-batch loss — no packing, no micro-batches, no scan, no gather."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import algorithms as alg
from jaxrlhf.models import TransformerConfig, hidden_states, lm_logits, positions_from_mask
from jaxrlhf.models.transformer import value_outputs

TINY = TransformerConfig(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    qkv_bias=True,
    max_position_embeddings=128,
)


def random_sequences(seed: int, n: int, lo: int, hi: int, vocab: int = TINY.vocab_size):
    """Token lists of ragged lengths with prompt/response loss masks (first token never
    scored), advantages, log-probs and values; one response is fully masked."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi + 1, size=n)
    ids, fields = [], {k: [] for k in ("loss_mask", "advantages", "behaviour_logp", "ref_logp")}
    fields |= {"returns": [], "old_values": []}
    for i, length in enumerate(lens):
        ids.append(rng.integers(0, vocab, length).astype(np.int32))
        mask = np.zeros(length, np.float32)
        if i != 1:  # sequence 1 has no scored token
            mask[rng.integers(1, length) :] = 1.0
        fields["loss_mask"].append(mask)
        fields["advantages"].append(rng.normal(size=length).astype(np.float32))
        fields["behaviour_logp"].append(-rng.exponential(2.0, length).astype(np.float32))
        fields["ref_logp"].append(-rng.exponential(2.0, length).astype(np.float32))
        fields["returns"].append(rng.normal(size=length).astype(np.float32))
        fields["old_values"].append(rng.normal(scale=0.1, size=length).astype(np.float32))
    return ids, fields


def pad_right(seqs, length: int, dtype=np.float32) -> np.ndarray:
    out = np.zeros((len(seqs), length), dtype)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = s
    return out


def padded_batch(ids, fields, length: int):
    """Right-padded ``[N, length]`` ids, attention mask and fields."""
    attn = pad_right([np.ones(len(s)) for s in ids], length, np.int32)
    return (
        pad_right(ids, length, np.int32),
        attn,
        {k: pad_right(v, length) for k, v in fields.items()},
    )


def _shift_gather(per_position_btv: jax.Array, ids_bt: np.ndarray) -> jax.Array:
    """out[b, t] = per_position[b, t − 1, ids[b, t]] for t >= 1, and 0 at t = 0."""
    B, T = ids_bt.shape
    rows, cols, prev, tokens = [], [], [], []
    for b in range(B):
        for t in range(1, T):
            rows.append(b)
            cols.append(t)
            prev.append(t - 1)
            tokens.append(int(ids_bt[b, t]))
    picked = per_position_btv[np.array(rows), np.array(prev), np.array(tokens)]
    return jnp.zeros((B, T), per_position_btv.dtype).at[np.array(rows), np.array(cols)].set(picked)


def _shift(per_position_bt: jax.Array) -> jax.Array:
    """out[b, t] = x[b, t − 1], 0 at t = 0."""
    return jnp.concatenate([jnp.zeros_like(per_position_bt[:, :1]), per_position_bt[:, :-1]], 1)


def ref_logp_entropy(params, cfg: TransformerConfig, ids, attn, temperature: float = 1.0):
    """Token-aligned log-probs and entropies of a padded batch, 0 where not scored."""
    positions, segments = positions_from_mask(jnp.asarray(attn))
    hidden = hidden_states(params, cfg, jnp.asarray(ids), positions, segments)
    logits = lm_logits(params, cfg, hidden) / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    scored = _shift(jnp.asarray(attn, jnp.float32)) * jnp.asarray(attn, jnp.float32)
    return _shift_gather(log_probs, np.asarray(ids)) * scored, _shift(entropy) * scored


def ref_values(params, cfg: TransformerConfig, ids, attn):
    """Token-aligned values (output at t − 1) and the score at each row's last real token."""
    positions, segments = positions_from_mask(jnp.asarray(attn))
    hidden = hidden_states(params, cfg, jnp.asarray(ids), positions, segments)
    v = value_outputs(params, hidden)
    last = np.asarray(attn).sum(1) - 1
    scores = jnp.stack([v[b, last[b]] for b in range(v.shape[0])])
    scored = _shift(jnp.asarray(attn, jnp.float32)) * jnp.asarray(attn, jnp.float32)
    return _shift(v) * scored, scores


def ref_actor_loss(params, cfg, spec, ids, attn, f):
    """The whole-batch actor objective, as `ActorLossSpec` describes it."""
    logp, entropy = ref_logp_entropy(params, cfg, ids, attn, spec.temperature)
    mask = f["loss_mask"]
    loss, _ = alg.POLICY_LOSSES.get(spec.policy_loss)(
        logp,
        f["old_logp"],
        f["behaviour_logp"] if spec.decoupled else None,
        f["advantages"],
        mask,
        eps_clip=spec.eps_clip,
        eps_clip_high=spec.eps_clip_high,
        dual_clip=spec.dual_clip,
        behaviour_weight_cap=spec.behaviour_weight_cap,
        aggregation=spec.aggregation,
        norm_constant=spec.norm_constant,
    )
    agg = dict(mode=spec.aggregation, norm_constant=spec.norm_constant)
    if spec.entropy_coef:
        loss = loss - spec.entropy_coef * alg.aggregate(entropy, mask, **agg)
    if spec.kl_coef:
        kl_bt = alg.kl(logp, f["ref_logp"], spec.kl_estimator, mask=mask)
        loss = loss + spec.kl_coef * alg.aggregate(kl_bt, mask, **agg)
    return loss


def ref_critic_loss(params, cfg, spec, ids, attn, f):
    """The whole-batch value loss, as `CriticLossSpec` describes it."""
    values, _ = ref_values(params, cfg, ids, attn)
    loss, _ = alg.critic_loss(
        values,
        f["old_values"] if spec.value_clip else None,
        f["returns"],
        f["loss_mask"],
        value_clip=spec.value_clip,
        loss_type=spec.loss_type,
        huber_delta=spec.huber_delta,
        aggregation=spec.aggregation,
    )
    return loss


def max_abs_diff(a, b) -> float:
    """Largest absolute difference over two pytrees of arrays."""
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def assert_tree_close(a, b, atol: float, rtol: float = 0.0) -> None:
    """np.testing.assert_allclose on every leaf of two matching pytrees."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)
