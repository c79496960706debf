"""Inference MFCs (log-probs, values, reward scores) and the critic train step against the plain
padded references in `interfaces_reference.py`; chunked log-probs (values and gradients)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from interfaces_reference import (
    TINY,
    assert_tree_close,
    max_abs_diff,
    padded_batch,
    random_sequences,
    ref_actor_loss,
    ref_critic_loss,
    ref_logp_entropy,
    ref_values,
)

from jaxrlhf.interfaces import (
    ActorLossSpec,
    CriticLossSpec,
    ParamLayout,
    accumulate_gradients,
    actor_microbatch_loss,
    batch_denominators,
    compile_inference,
    compute_logprobs,
    compute_scores,
    compute_values,
    critic_microbatch_loss,
    init_train_state,
    pack_sequences,
    put_batch,
    run_train_step,
    unpack,
    unpack_scalars,
)
from jaxrlhf.interfaces.inference import INPUT_KEYS
from jaxrlhf.interfaces.reference import logprob_outputs
from jaxrlhf.models import init_model
from jaxrlhf.optim import OptimizerSpec

N, LO, HI = 7, 4, 24


@pytest.fixture(scope="module")
def data():
    ids, fields = random_sequences(seed=11, n=N, lo=LO, hi=HI)
    # Small budget and a floor on M: several micro-batches plus an empty filler one.
    packed = pack_sequences(ids, fields, max_tokens_per_mb=32, min_microbatches=8)
    assert packed.arrays["seq_lens"][-1].sum() == 0
    return ids, fields, packed, padded_batch(ids, fields, HI)


def _per_sequence(padded_bt, ids):
    return [np.asarray(padded_bt)[b, : len(s)] for b, s in enumerate(ids)]


def test_logprobs_and_entropy_match_padded_reference(data):
    ids, _, packed, (pid, attn, _) = data
    params = init_model(TINY, seed=1).params
    out = compute_logprobs(params, TINY, packed, temperature=0.7, with_entropy=True)
    ref_logp, ref_ent = ref_logp_entropy(params, TINY, pid, attn, temperature=0.7)
    for got, want in zip(unpack(packed, out["logp"]), _per_sequence(ref_logp, ids), strict=True):
        assert got[0] == 0.0  # token 0 has no log-prob
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for got, want in zip(unpack(packed, out["entropy"]), _per_sequence(ref_ent, ids), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert float(jnp.abs(out["logp"][-1]).max()) == 0.0  # the filler micro-batch

    chunked = compute_logprobs(params, TINY, packed, temperature=0.7, chunk_size=7)
    np.testing.assert_allclose(chunked["logp"], out["logp"], atol=1e-6, rtol=0)


def test_inference_compiles_once_per_shape(data):
    """Equal shapes and options (in any keyword order) reuse one compiled inference step."""
    _, _, packed, _ = data
    params = init_model(TINY, seed=1).params
    compute_logprobs(params, TINY, packed, with_entropy=True, temperature=0.7)
    misses = compile_inference.cache_info().misses
    compute_logprobs(params, TINY, packed, temperature=0.7, with_entropy=True)
    assert compile_inference.cache_info().misses == misses
    shapes = tuple((k, s) for k, s in packed.shapes() if k in INPUT_KEYS)
    options = (("temperature", 0.7), ("with_entropy", True))
    step = compile_inference(logprob_outputs, TINY, None, ParamLayout.of(params), shapes, options)
    assert step._cache_size() == 1


def test_chunked_logprob_gradients_match_reference(data):
    """``logits_chunk``: the checkpointed chunk loop gives the whole-batch gradient."""
    ids, fields, _, _ = data
    params = init_model(TINY, seed=2).params
    fields = {**fields, "old_logp": fields["behaviour_logp"]}
    spec = ActorLossSpec(entropy_coef=0.05, logits_chunk=5)
    packed = pack_sequences(ids, fields, max_tokens_per_mb=32)
    pid, attn, pf = padded_batch(ids, fields, HI)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda p: ref_actor_loss(p, TINY, spec, pid, attn, pf)
    )(params)

    @jax.jit
    def grads(params, batch):
        mb_loss = functools.partial(actor_microbatch_loss, cfg=TINY, spec=spec)
        g, metrics = accumulate_gradients(mb_loss, params, batch, batch_denominators(batch))
        return g, metrics["loss"].sum()

    g, loss = grads(params, put_batch(packed, None))
    assert abs(float(loss) - float(ref_loss)) < 1e-6
    assert_tree_close(g, ref_grads, atol=1e-6, rtol=1e-5)  # the entropy term: |g| up to ~0.3


def test_values_and_scores_match_padded_reference(data):
    ids, _, packed, (pid, attn, _) = data
    params = init_model(TINY, seed=3, value_head=True, lm_head=False).params
    # A non-zero head bias, so a missing or shifted term would show.
    params["value_head"]["bias"] = jnp.asarray(0.3)
    ref_v, ref_scores = ref_values(params, TINY, pid, attn)
    values = unpack(packed, compute_values(params, TINY, packed)["values"])
    for got, want in zip(values, _per_sequence(ref_v, ids), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    scores = unpack_scalars(packed, compute_scores(params, TINY, packed)["scores"])
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no value_head"):
        compute_values(init_model(TINY, seed=3).params, TINY, packed)


def test_critic_step_matches_reference(data):
    """Critic gradient (clipped Huber value loss) against the padded reference; one train step:
    loss, batch-wide explained variance and the update."""
    ids, fields, packed, (pid, attn, pf) = data
    params = init_model(TINY, seed=4, value_head=True, lm_head=False).params
    spec = CriticLossSpec(value_clip=0.05, loss_type="huber", huber_delta=0.5)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda p: ref_critic_loss(p, TINY, spec, pid, attn, pf)
    )(params)

    @jax.jit
    def grads(params, batch):
        mb_loss = functools.partial(critic_microbatch_loss, cfg=TINY, spec=spec)
        return accumulate_gradients(mb_loss, params, batch, batch_denominators(batch))[0]

    assert max_abs_diff(grads(params, put_batch(packed, None)), ref_grads) < 1e-6

    ref_v, _ = ref_values(params, TINY, pid, attn)
    mask = pf["loss_mask"] > 0
    ret, res = pf["returns"][mask], (pf["returns"] - np.asarray(ref_v))[mask]
    ev = 1.0 - np.var(res.astype(np.float64)) / np.var(ret.astype(np.float64))

    opt = OptimizerSpec(lr=1e-2, grad_clip=None)
    state = init_train_state(jax.tree.map(jnp.copy, params), TINY, opt)
    state, metrics = run_train_step(
        critic_microbatch_loss, state, packed, cfg=TINY, spec=spec, opt=opt
    )
    m = {k: float(v) for k, v in metrics.items()}
    assert m["loss"] == pytest.approx(float(ref_loss), abs=1e-6)
    assert m["value_loss"] == m["loss"] and m["tokens"] == mask.sum()
    assert m["explained_variance"] == pytest.approx(ev, abs=1e-5)
    assert 0.0 < m["clip_frac"] < 1.0
    assert not any(k.startswith("sum_") for k in m)
    # First Adam step without clipping: each entry moves by lr · sign(g) where |g| >> eps.
    g, moved = np.asarray(ref_grads["value_head"]["kernel"]), state.params["value_head"]["kernel"]
    big = np.abs(g) > 1e-4
    want = np.asarray(params["value_head"]["kernel"]) - 1e-2 * np.sign(g)
    np.testing.assert_allclose(np.asarray(moved)[big], want[big], atol=1e-5)

    no_old = {k: v for k, v in fields.items() if k != "old_values"}
    with pytest.raises(ValueError, match="lacks old_values"):
        run_train_step(
            critic_microbatch_loss,
            state,
            pack_sequences(ids, no_old, max_tokens_per_mb=32, min_microbatches=8),
            cfg=TINY,
            spec=spec,
            opt=opt,
        )


def test_bfloat16_params_train_step(data):
    """bfloat16 params and compute: the step keeps params and Adam moments in bfloat16."""
    ids, fields, _, _ = data
    cfg = TINY.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params = init_model(cfg, seed=5).params
    spec = ActorLossSpec(on_policy=True)
    packed = pack_sequences(
        ids, {k: fields[k] for k in ("loss_mask", "advantages")}, max_tokens_per_mb=32
    )
    opt = OptimizerSpec(lr=1e-2)
    state = init_train_state(params, cfg, opt)
    before = np.asarray(state.params["embed"], np.float32)
    state, metrics = run_train_step(
        actor_microbatch_loss, state, packed, cfg=cfg, spec=spec, opt=opt
    )
    assert state.params["embed"].dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype("bfloat16")}
    assert np.isfinite(float(metrics["loss"])) and float(metrics["ratio_max"]) == 1.0
    assert np.abs(np.asarray(state.params["embed"], np.float32) - before).max() > 1e-3
