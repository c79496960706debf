"""Actor train step against a plain padded whole-batch reference (`interfaces_reference.py`):
gradients for packed / padded / 1×8 / 8×1 micro-batching, step-0 invariants, the optimizer
update, all-masked input, compile caching and bad input.

Each test owns the compilations it needs (so `pytest -n` workers do not repeat them); the
objective covers sequence-level aggregation, dual clip, KL and entropy terms.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from interfaces_reference import (
    TINY,
    max_abs_diff,
    padded_batch,
    random_sequences,
    ref_actor_loss,
    ref_logp_entropy,
)

from jaxrlhf.interfaces import (
    ActorLossSpec,
    ParamLayout,
    accumulate_gradients,
    actor_microbatch_loss,
    batch_denominators,
    compile_train_step,
    compute_logprobs,
    init_train_state,
    pack_sequences,
    put_batch,
    run_train_step,
    unpack,
)
from jaxrlhf.models import init_model
from jaxrlhf.optim import OptimizerSpec

N, LO, HI = 8, 5, 24
# Sequence-level aggregation, dual clip, KL and entropy terms: every path of the objective.
SPEC = ActorLossSpec(
    eps_clip=0.2,
    eps_clip_high=0.28,
    dual_clip=3.0,
    aggregation="seq_mean_token_mean",
    kl_coef=0.1,
    entropy_coef=0.01,
    temperature=0.9,
)
OPT = OptimizerSpec(lr=1e-3, grad_clip=1.0, weight_decay=0.01)
# Floors on the micro-batch and slot counts: steady shapes, so train steps share one compile.
STEADY = dict(max_tokens_per_mb=48, min_microbatches=4, min_slots=4)


@pytest.fixture(scope="module")
def setup():
    params = init_model(TINY, seed=0).params
    ids, fields = random_sequences(seed=1, n=N, lo=LO, hi=HI)
    # π_old: the current policy perturbed, so ratios differ from 1 and clipping happens.
    rng = np.random.default_rng(2)
    probe = pack_sequences(ids, fields, max_tokens_per_mb=48)
    logp = unpack(probe, compute_logprobs(params, TINY, probe, temperature=0.9)["logp"])
    fields["old_logp"] = [lp + rng.normal(0, 0.3, lp.shape).astype(np.float32) for lp in logp]
    return params, ids, fields


def reference(params, ids, fields, spec=SPEC):
    """Loss and gradient of the whole padded batch (eager: the shift indexes with concrete ids)."""
    pid, attn, pf = padded_batch(ids, fields, HI)
    return jax.value_and_grad(lambda p: ref_actor_loss(p, TINY, spec, pid, attn, pf))(params)


@functools.cache
def _grad_fn(spec: ActorLossSpec):
    def fn(params, batch):
        den = batch_denominators(batch)
        mb_loss = functools.partial(actor_microbatch_loss, cfg=TINY, spec=spec)
        grads, metrics = accumulate_gradients(mb_loss, params, batch, den)
        return grads, metrics["loss"].sum()

    return jax.jit(fn)


def grads_of(params, packed, spec=SPEC):
    return _grad_fn(spec)(params, put_batch(packed, None))


def test_packed_and_padded_match_whole_batch_reference(setup):
    """Packed (several micro-batches), padded 1 micro-batch of 8 and padded 8 micro-batches of
    1 all give the whole-batch loss and gradients; 1×8 and 8×1 agree to 1e-6; an all-masked
    micro-batch adds nothing."""
    params, ids, fields = setup
    ref_loss, ref_grads = reference(params, ids, fields)
    packed = pack_sequences(ids, fields, max_tokens_per_mb=48)
    one = pack_sequences(ids, fields, max_tokens_per_mb=8 * HI, row_len=HI, pack=False)
    eight = pack_sequences(ids, fields, max_tokens_per_mb=HI, row_len=HI, pack=False)
    used_rows = lambda b: int(np.sum(b.arrays["segment_ids"].max(-1) > 0))
    assert used_rows(packed) < used_rows(one) == N  # packing removed padding
    assert packed.num_microbatches > 1
    assert one.num_microbatches == 1 and eight.num_microbatches == 8
    results = [grads_of(params, batch) for batch in (packed, one, eight)]
    for grads, loss in results:
        assert abs(float(loss) - float(ref_loss)) < 1e-6
        assert max_abs_diff(grads, ref_grads) < 1e-6
    (g1, l1), (g8, l8) = results[1:]
    assert abs(float(l1) - float(l8)) < 1e-6
    assert max_abs_diff(g1, g8) < 1e-6
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g1)) > 1e-2  # not vacuous

    # A micro-batch whose loss tokens are all masked adds exactly nothing.
    in_first = set(packed.seq_index[0][packed.seq_index[0] >= 0].tolist())
    silent = [m * (i not in in_first) for i, m in enumerate(fields["loss_mask"])]
    masked = {**fields, "loss_mask": silent}
    packed_masked = pack_sequences(ids, masked, max_tokens_per_mb=48)
    assert packed_masked.arrays["loss_mask"][0].sum() == 0
    assert packed_masked.shapes() == packed.shapes()
    ref_loss, ref_grads = reference(params, ids, masked)
    grads, loss = grads_of(params, packed_masked)
    assert abs(float(loss) - float(ref_loss)) < 1e-6
    assert max_abs_diff(grads, ref_grads) < 1e-6


def test_gspo_decoupled_token_sum_norm(setup):
    params, ids, fields = setup
    spec = ActorLossSpec(
        policy_loss="gspo",
        eps_clip=0.05,
        decoupled=True,
        behaviour_weight_cap=2.0,
        aggregation="seq_mean_token_sum_norm",
        norm_constant=float(HI),
    )
    ref_loss, ref_grads = reference(params, ids, fields, spec)
    grads, loss = grads_of(params, pack_sequences(ids, fields, max_tokens_per_mb=48), spec)
    assert abs(float(loss) - float(ref_loss)) < 1e-6
    assert max_abs_diff(grads, ref_grads) < 1e-6


def _numpy_adamw_first_step(p, g, lr, wd, eps, decay):
    # First Adam step: m̂ = g, v̂ = g², so the update is g / (|g| + eps).
    return p - lr * (g / (np.abs(g) + eps) + (wd * p if decay else 0.0))


def test_train_step_at_step_0_on_policy(setup):
    """Unchanged policy (``on_policy``): ratio exactly 1, approx KL 0, no clipping; the update
    is AdamW on the clipped reference gradient; metrics are device scalars."""
    params, ids, fields = setup
    no_old = {k: v for k, v in fields.items() if k != "old_logp"}
    on_policy = dataclasses.replace(SPEC, on_policy=True)
    # The reference takes π_old = π_θ as data: the same value, and no gradient through it.
    old = jax.tree.map(
        np.asarray,
        ref_logp_entropy(params, TINY, *padded_batch(ids, {}, HI)[:2], temperature=0.9)[0],
    )
    _, ref_grads = reference(params, ids, {**fields, "old_logp": list(old)})
    ref_norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(ref_grads)))

    state = init_train_state(jax.tree.map(jnp.copy, params), TINY, OPT)
    packed = pack_sequences(ids, no_old, max_tokens_per_mb=48)
    state, metrics = run_train_step(
        actor_microbatch_loss, state, packed, cfg=TINY, spec=on_policy, opt=OPT
    )
    assert all(isinstance(v, jax.Array) and v.shape == () for v in metrics.values())
    m = {k: float(v) for k, v in metrics.items()}
    assert m["ratio_mean"] == m["ratio_max"] == m["ratio_min"] == 1.0
    assert m["approx_kl"] == 0.0
    assert m["clip_frac"] == m["clip_frac_low"] == m["clip_frac_high"] == 0.0
    assert m["dual_clip_frac"] == 0.0
    assert m["tokens"] == sum(float(x.sum()) for x in fields["loss_mask"])
    assert m["seqs"] == N - 1  # sequence 1 has no scored token
    assert m["lr"] == pytest.approx(OPT.lr)
    assert m["update_skipped"] == 0.0 and int(state.step) == 1
    assert m["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert m["entropy"] > 0 and m["kl"] > 0

    scale = min(1.0, OPT.grad_clip / ref_norm)
    for name in ("embed", "final_norm"):
        g = np.asarray(ref_grads[name]) * scale
        p = np.asarray(params[name])
        want = _numpy_adamw_first_step(p, g, OPT.lr, OPT.weight_decay, OPT.eps, name == "embed")
        big = np.abs(g) > 1e-3 * np.abs(g).max()  # where Adam's g/|g| is well conditioned
        np.testing.assert_allclose(np.asarray(state.params[name])[big], want[big], atol=1e-6)


def test_separate_old_logp_all_masked_batch_and_compile_reuse(setup):
    """π_old from `compute_logprobs` (another XLA program): ratio 1 to float rounding. A batch
    without loss tokens skips the update. Batches of one bucket share one compiled step."""
    params, ids, fields = setup
    probe = pack_sequences(ids, fields, max_tokens_per_mb=48)
    old = unpack(probe, compute_logprobs(params, TINY, probe, temperature=0.9)["logp"])
    state = init_train_state(jax.tree.map(jnp.copy, params), TINY, OPT)
    packed = pack_sequences(ids, {**fields, "old_logp": old}, **STEADY)
    shapes = {packed.shapes()}
    state, metrics = run_train_step(
        actor_microbatch_loss, state, packed, cfg=TINY, spec=SPEC, opt=OPT
    )
    m = {k: float(v) for k, v in metrics.items()}
    assert abs(m["ratio_max"] - 1) < 2e-6 and abs(m["ratio_min"] - 1) < 2e-6
    assert abs(m["approx_kl"]) < 1e-11
    assert m["clip_frac"] == m["dual_clip_frac"] == 0.0

    silent = {**fields, "loss_mask": [np.zeros_like(x) for x in fields["loss_mask"]]}
    packed = pack_sequences(ids, silent, **STEADY)
    shapes.add(packed.shapes())
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = run_train_step(
        actor_microbatch_loss, state, packed, cfg=TINY, spec=SPEC, opt=OPT
    )
    assert float(metrics["loss"]) == 0.0 and float(metrics["tokens"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0 and float(metrics["update_skipped"]) == 1.0
    assert int(state.step) == 1
    assert max_abs_diff(state.params, before) == 0.0

    lengths = set()
    for seed in (3, 4):
        other_ids, other = random_sequences(seed=seed, n=N - 2, lo=LO, hi=HI - 3)
        other["old_logp"] = other["behaviour_logp"]
        other = {k: other[k] for k in fields}  # the same fields, so the same shapes
        packed = pack_sequences(other_ids, other, **STEADY)
        shapes.add(packed.shapes())
        lengths.add(tuple(len(x) for x in other_ids))
        state, _ = run_train_step(
            actor_microbatch_loss, state, packed, cfg=TINY, spec=SPEC, opt=OPT
        )
    assert len(shapes) == 1 and len(lengths) == 2
    layout = ParamLayout.of(params)
    step = compile_train_step(
        actor_microbatch_loss, SPEC, TINY, OPT, None, None, layout, shapes.pop()
    )
    assert step._cache_size() == 1  # four batches, one compilation


def test_bad_input(setup):
    params, ids, fields = setup
    packed = pack_sequences(ids, fields, max_tokens_per_mb=48)
    state = init_train_state(jax.tree.map(jnp.copy, params), TINY, OPT)
    no_ref = {k: v for k, v in fields.items() if k != "ref_logp"}
    with pytest.raises(ValueError, match="lacks ref_logp"):
        run_train_step(
            actor_microbatch_loss,
            state,
            pack_sequences(ids, no_ref, max_tokens_per_mb=48),
            cfg=TINY,
            spec=SPEC,
            opt=OPT,
        )
    batch = put_batch(packed, None)
    batch["advantages"] = batch["advantages"][:, :, :-1]
    from jaxrlhf.interfaces import train_step

    with pytest.raises(ValueError, match="advantages"):
        train_step(actor_microbatch_loss, state, batch, cfg=TINY, spec=SPEC, opt=OPT)
