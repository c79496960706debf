"""jaxrlhf.algorithms against independent NumPy references written as explicit Python loops.

References work token by token in float64 with `math`, on random inputs with ragged masks
(right, left and interior padding, and one empty row); the JAX side runs jitted in float32.
"""

from __future__ import annotations

import math
import statistics
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import algorithms as alg
from jaxrlhf.registry import RegistryError

B, T = 6, 12
AGGREGATIONS = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
)


# --- inputs ---------------------------------------------------------------------------------


def ragged_mask(rng: np.random.Generator, batch: int = B, length: int = T) -> np.ndarray:
    """Rows: full, right-padded, left-padded, interior holes, empty, both-sides padded."""
    m = np.zeros((batch, length), bool)
    m[0, :] = True
    m[1, :5] = True
    m[2, length - 4 :] = True
    m[3, :] = rng.random(length) < 0.6
    m[3, 1] = True
    # row 4 stays empty
    m[5, 2 : length - 1] = True
    return m


def policy_inputs(seed: int, logratio_scale: float = 0.6, behav_scale: float = 0.7):
    rng = np.random.default_rng(seed)
    mask = ragged_mask(rng)
    logp = -rng.exponential(1.0, (B, T))
    prox = logp + rng.normal(0, logratio_scale, (B, T))
    behav = prox + rng.normal(0, behav_scale, (B, T))
    adv = rng.normal(0, 1.0, (B, T))
    return logp, prox, behav, adv, mask


def f32(*xs):
    return tuple(None if x is None else jnp.asarray(x, jnp.float32) for x in xs)


# --- loop references ------------------------------------------------------------------------


def ref_aggregate(tok, mask, mode, norm_constant=None, tokens=None, seqs=None):
    batch, length = mask.shape
    n_tokens = sum(1 for b in range(batch) for t in range(length) if mask[b, t])
    n_seqs = sum(1 for b in range(batch) if any(mask[b]))
    n_tokens = n_tokens if tokens is None else tokens
    n_seqs = n_seqs if seqs is None else seqs
    if mode == "token_mean":
        total = 0.0
        for b in range(batch):
            for t in range(length):
                if mask[b, t]:
                    total += tok[b][t]
        return total / max(n_tokens, 1)
    per_seq = []
    for b in range(batch):
        vals = [tok[b][t] for t in range(length) if mask[b, t]]
        if not vals:
            continue
        if mode == "seq_mean_token_mean":
            per_seq.append(sum(vals) / len(vals))
        elif mode == "seq_mean_token_sum":
            per_seq.append(sum(vals))
        else:
            per_seq.append(sum(vals) / (length if norm_constant is None else norm_constant))
    return sum(per_seq) / max(n_seqs, 1)


def ref_surrogate_token(r, a, eps_low, eps_high, dual_clip):
    """One token's clipped loss, written branch by branch (not as max/clip)."""
    if a >= 0:
        loss, branch = -a * min(r, 1 + eps_high), ("high" if a > 0 and r > 1 + eps_high else "")
    else:
        loss, branch = -a * max(r, 1 - eps_low), ("low" if r < 1 - eps_low else "")
        if dual_clip is not None and loss > dual_clip * abs(a):
            loss, branch = dual_clip * abs(a), "dual"
    return loss, branch


def ref_weight(lp_prox, lp_behav, cap, mode):
    if lp_behav is None:
        return 1.0, False
    w = math.exp(lp_prox - lp_behav)
    if cap is not None and w > cap:
        return (cap if mode == "truncate" else 0.0), True
    return w, False


def ref_policy_loss(logp, prox, behav, adv, mask, *, sequence_ratio=False, **cfg):
    eps_low = cfg["eps_clip"]
    eps_high = cfg.get("eps_clip_high") or eps_low
    dual = cfg.get("dual_clip")
    cap, wmode = cfg.get("behaviour_weight_cap"), cfg.get("behaviour_weight_mode", "truncate")
    mode = cfg.get("aggregation", "seq_mean_token_mean" if sequence_ratio else "token_mean")
    tok = [[0.0] * T for _ in range(B)]
    counts = {"low": 0, "high": 0, "dual": 0, "": 0}
    kl_sum, weights, ratios, over = 0.0, [], [], 0
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        if sequence_ratio and valid:
            seq_ratio = math.exp(sum(logp[b, t] - prox[b, t] for t in valid) / len(valid))
        for t in valid:
            r = seq_ratio if sequence_ratio else math.exp(logp[b, t] - prox[b, t])
            loss, branch = ref_surrogate_token(r, adv[b, t], eps_low, eps_high, dual)
            w, is_over = ref_weight(prox[b, t], None if behav is None else behav[b, t], cap, wmode)
            tok[b][t] = w * loss
            counts[branch] += 1
            rr = math.exp(logp[b, t] - prox[b, t])
            kl_sum += rr - 1 - math.log(rr)
            weights.append(w)
            ratios.append(r)
            over += is_over
    n = len(weights)
    metrics = {
        "clip_frac_low": counts["low"] / n,
        "clip_frac_high": counts["high"] / n,
        "clip_frac": (counts["low"] + counts["high"]) / n,
        "dual_clip_frac": counts["dual"] / n,
        "approx_kl": kl_sum / n,
        "ratio_mean": sum(ratios) / n,
        "ratio_max": max(ratios),
        "ratio_min": min(ratios),
        "importance_weight_mean": sum(weights) / n,
        "importance_weight_max": max(weights),
        "importance_weight_min": min(weights),
        "importance_weight_over_cap_frac": over / n,
        "tokens": n,
    }
    return ref_aggregate(tok, mask, mode, cfg.get("norm_constant")), metrics


def numeric_grad(f, x, mask, h=1e-6):
    """Central differences of a float64 scalar function at the valid entries of ``x``."""
    g = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if not mask[b, t]:
                continue
            xp, xm = x.copy(), x.copy()
            xp[b, t] += h
            xm[b, t] -= h
            g[b, t] = (f(xp) - f(xm)) / (2 * h)
    return g


# --- registries -----------------------------------------------------------------------------


def test_registries_hold_the_config_names():
    assert alg.POLICY_LOSSES.names() == ["gspo", "ppo"]
    assert alg.ADVANTAGE_ESTIMATORS.names() == ["dr_grpo", "gae", "grpo", "reinforce_pp", "rloo"]
    assert alg.KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert sorted(AGGREGATIONS) == alg.LOSS_AGGREGATIONS.names()
    assert alg.POLICY_LOSSES.get("ppo") is alg.ppo_actor_loss
    with pytest.raises(RegistryError, match="did you mean 'grpo'"):
        alg.ADVANTAGE_ESTIMATORS.get("grpoo")


# --- aggregation ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_matches_loop_reference(mode):
    rng = np.random.default_rng(0)
    mask = ragged_mask(rng)
    x = rng.normal(size=(B, T))
    got = jax.jit(partial(alg.aggregate, mode=mode, norm_constant=20.0))(*f32(x, mask))
    np.testing.assert_allclose(got, ref_aggregate(x, mask, mode, 20.0), rtol=1e-5)
    # A float mask gives the same as a bool one; global denominators replace local counts.
    den = alg.Denominators(tokens=jnp.float32(100.0), seqs=jnp.float32(9.0))
    got = alg.aggregate(*f32(x), jnp.asarray(mask), mode, denominators=den, norm_constant=20.0)
    want = ref_aggregate(x, mask, mode, 20.0, tokens=100, seqs=9)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_with_global_denominators_equal_the_full_batch(mode):
    """Loss and parameter gradient: 1 batch of 6 == 6 micro-batches of 1 (<= 1e-6)."""
    logp, prox, behav, adv, mask = policy_inputs(1)
    feat = np.random.default_rng(2).normal(size=(B, T, 3)) * 0.3
    theta = jnp.asarray([0.1, -0.2, 0.3], jnp.float32)

    def loss_fn(th, base, feat, prox, behav, adv, mask, den):
        lp = base + feat @ th  # a stand-in model: every row depends on the shared parameters
        loss, _ = alg.ppo_actor_loss(
            lp, prox, behav, adv, mask, eps_clip=0.2, eps_clip_high=0.28, dual_clip=3.0,
            behaviour_weight_cap=2.0, aggregation=mode, denominators=den, norm_constant=16.0,
        )  # fmt: skip
        return loss

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    args = f32(logp, feat, prox, behav, adv, mask)
    den = alg.loss_denominators(args[-1])
    full_loss, full_grad = value_and_grad(theta, *args, den)
    loss_sum, grad_sum = 0.0, jnp.zeros(3)
    for b in range(B):
        mb_loss, mb_grad = value_and_grad(theta, *(a[b : b + 1] for a in args), den)
        loss_sum, grad_sum = loss_sum + mb_loss, grad_sum + mb_grad
    np.testing.assert_allclose(loss_sum, full_loss, atol=1e-6)
    np.testing.assert_allclose(grad_sum, full_grad, atol=1e-6)
    assert float(jnp.abs(full_grad).sum()) > 0


# --- PPO actor loss -------------------------------------------------------------------------

PPO_CONFIGS = {
    "symmetric": dict(eps_clip=0.2),
    "clip_higher_dual": dict(eps_clip=0.2, eps_clip_high=0.28, dual_clip=2.0),
    "decoupled_truncate": dict(eps_clip=0.2, behaviour_weight_cap=1.5),
    "decoupled_mask_seqmean": dict(
        eps_clip=0.15,
        eps_clip_high=0.3,
        dual_clip=2.5,
        behaviour_weight_cap=1.5,
        behaviour_weight_mode="mask",
        aggregation="seq_mean_token_mean",
    ),
    "dr_grpo_norm": dict(eps_clip=0.2, aggregation="seq_mean_token_sum_norm", norm_constant=16.0),
}


@pytest.mark.parametrize("name", list(PPO_CONFIGS))
def test_ppo_actor_loss_matches_loop_reference(name):
    cfg = PPO_CONFIGS[name]
    logp, prox, behav, adv, mask = policy_inputs(3)
    if "behaviour_weight_cap" not in cfg:
        behav = None
    loss, metrics = jax.jit(partial(alg.ppo_actor_loss, **cfg))(*f32(logp, prox, behav, adv, mask))
    want_loss, want_metrics = ref_policy_loss(logp, prox, behav, adv, mask, **cfg)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    for key, want in want_metrics.items():
        np.testing.assert_allclose(metrics[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
    # The inputs exercise the branches this config enables.
    assert want_metrics["clip_frac_low"] > 0 and want_metrics["clip_frac_high"] > 0
    if cfg.get("dual_clip"):
        assert want_metrics["dual_clip_frac"] > 0
    if behav is not None:
        assert want_metrics["importance_weight_over_cap_frac"] > 0


def test_ppo_gradient_matches_finite_differences_of_the_reference():
    cfg = PPO_CONFIGS["decoupled_mask_seqmean"] | {"behaviour_weight_mode": "truncate"}
    logp, prox, behav, adv, mask = policy_inputs(4)
    grad_fn = jax.jit(jax.grad(lambda *a: alg.ppo_actor_loss(*a, **cfg)[0]))
    got = grad_fn(*f32(logp, prox, behav, adv, mask))
    want = numeric_grad(
        lambda lp: ref_policy_loss(lp, prox, behav, adv, mask, **cfg)[0], logp, mask
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.asarray(got)[~mask] == 0)
    assert np.count_nonzero(want) > mask.sum() // 2  # most tokens are not clipped


def test_unchanged_policy_gives_ratio_one_zero_kl_no_clipping():
    logp, _, _, adv, mask = policy_inputs(5)
    lp, a, m = f32(logp, adv, mask)
    for loss_fn in (alg.ppo_actor_loss, alg.gspo_actor_loss):
        fn = partial(loss_fn, eps_clip=0.2, dual_clip=3.0, aggregation="token_mean")
        (loss, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(lp, lp, lp, a, m)
        assert metrics["ratio_max"] == 1.0 and metrics["ratio_min"] == 1.0
        assert metrics["approx_kl"] == 0.0
        assert metrics["clip_frac"] == 0.0 and metrics["dual_clip_frac"] == 0.0
        assert metrics["importance_weight_max"] == 1.0 and metrics["importance_weight_min"] == 1.0
        n = mask.sum()
        np.testing.assert_allclose(loss, -(adv * mask).sum() / n, rtol=1e-5)
        np.testing.assert_allclose(grad, -adv * mask / n, rtol=1e-5, atol=1e-7)


def test_dual_clip_bounds_negative_advantage_loss():
    @jax.jit
    def run(logp, prox, adv, one):
        plain = alg.ppo_actor_loss(logp, prox, None, adv, one, eps_clip=0.2)
        bounded = alg.ppo_actor_loss(logp, prox, None, adv, one, eps_clip=0.2, dual_clip=3.0)
        positive = alg.ppo_actor_loss(logp, prox, None, -adv, one, eps_clip=0.2, dual_clip=3.0)
        return plain, bounded, positive

    one = jnp.ones((1, 1))
    (plain, _), (bounded, metrics), (_, pos_metrics) = run(
        jnp.log(10.0) * one, 0 * one, -1.5 * one, one
    )
    np.testing.assert_allclose(plain, 15.0, rtol=1e-6)
    np.testing.assert_allclose(bounded, 3.0 * 1.5, rtol=1e-6)
    assert metrics["dual_clip_frac"] == 1.0
    # Positive advantages are never dual-clipped.
    assert pos_metrics["dual_clip_frac"] == 0.0 and pos_metrics["clip_frac_high"] == 1.0


def test_decoupled_weights_are_capped_and_default_to_one():
    kw = dict(eps_clip=0.2, behaviour_weight_cap=1.5)

    @jax.jit
    def run(logp, prox, behav, adv, mask):
        far = prox - 5.0  # every weight is e^5 before the cap
        return (
            alg.ppo_actor_loss(logp, prox, far, adv, mask, **kw),
            alg.ppo_actor_loss(logp, prox, behav, adv, mask, **kw),
            alg.ppo_actor_loss(logp, prox, far, adv, mask, **kw, behaviour_weight_mode="mask"),
            alg.ppo_actor_loss(logp, prox, None, adv, mask, eps_clip=0.2),
            alg.ppo_actor_loss(logp, prox, prox, adv, mask, **kw),
        )

    far, random, masked, no_behav, same = run(*f32(*policy_inputs(6)))
    assert far[1]["importance_weight_min"] == pytest.approx(1.5)
    assert far[1]["importance_weight_max"] == pytest.approx(1.5)
    assert far[1]["importance_weight_over_cap_frac"] == 1.0
    assert random[1]["importance_weight_max"] <= 1.5 + 1e-6
    assert 0 < random[1]["importance_weight_over_cap_frac"] < 1
    assert masked[0] == 0.0
    # behaviour == proximal, or None, is ordinary PPO.
    assert no_behav[0] == same[0]
    assert same[1]["importance_weight_min"] == same[1]["importance_weight_max"] == 1.0


# --- GSPO -----------------------------------------------------------------------------------


def test_gspo_matches_loop_reference_and_sequence_level_gradient():
    logp, prox, _, _, mask = policy_inputs(7, logratio_scale=0.15)
    adv_b = np.array([-1.2, 0.8, -0.5, -1.5, 0.9, 0.7])
    adv = np.repeat(adv_b[:, None], T, axis=1)
    cfg = dict(eps_clip=0.02, eps_clip_high=0.04)
    fn = jax.jit(jax.value_and_grad(partial(alg.gspo_actor_loss, **cfg), has_aux=True))
    (loss, metrics), grad = fn(*f32(logp, prox, None, adv, mask))
    want_loss, want_metrics = ref_policy_loss(
        logp, prox, None, adv, mask, sequence_ratio=True, **cfg
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    for key in ("clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
    assert 0 < want_metrics["clip_frac"] < 1

    def sequence_objective(lp):  # the GSPO paper's form: one clipped term per sequence
        terms = []
        for b in range(B):
            valid = [t for t in range(T) if mask[b, t]]
            if valid:
                s = math.exp(sum(lp[b, t] - prox[b, t] for t in valid) / len(valid))
                lo, hi = 1 - cfg["eps_clip"], 1 + cfg["eps_clip_high"]
                terms.append(-min(s * adv_b[b], min(max(s, lo), hi) * adv_b[b]))
        return sum(terms) / len(terms)

    np.testing.assert_allclose(loss, sequence_objective(logp), rtol=1e-5)
    np.testing.assert_allclose(grad, numeric_grad(sequence_objective, logp, mask), atol=1e-5)


# --- critic, entropy, KL --------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["mse", "huber"])
def test_critic_loss_matches_loop_reference(loss_type):
    rng = np.random.default_rng(9)
    mask = ragged_mask(rng)
    old = rng.normal(size=(B, T))
    values = old + rng.normal(0, 0.5, (B, T))
    returns = rng.normal(0, 1.5, (B, T))
    clip, delta = 0.3, 0.8
    fn = partial(alg.critic_loss, value_clip=clip, loss_type=loss_type, huber_delta=delta)
    loss, metrics = jax.jit(fn)(*f32(values, old, returns, mask))

    def ell(e):
        if loss_type == "mse" or abs(e) <= delta:
            return 0.5 * e * e
        return delta * (abs(e) - 0.5 * delta)

    tok = [[0.0] * T for _ in range(B)]
    n_clipped, rets, resid = 0, [], []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                v_clip = min(max(values[b, t], old[b, t] - clip), old[b, t] + clip)
                plain, clipped = ell(values[b, t] - returns[b, t]), ell(v_clip - returns[b, t])
                tok[b][t] = max(plain, clipped)
                n_clipped += clipped > plain
                rets.append(returns[b, t])
                resid.append(returns[b, t] - values[b, t])
    np.testing.assert_allclose(loss, ref_aggregate(tok, mask, "token_mean"), rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_frac"], n_clipped / len(rets), rtol=1e-6)
    ev = 1 - statistics.pvariance(resid) / statistics.pvariance(rets)
    np.testing.assert_allclose(metrics["explained_variance"], ev, rtol=1e-4)
    assert 0 < n_clipped < len(rets)


def test_entropy_matches_loop_reference_and_handles_minus_inf_logits():
    rng = np.random.default_rng(10)
    mask = ragged_mask(rng)
    logits = rng.normal(0, 2.0, (B, T, 7))
    logits[0, 0, :3] = -np.inf  # vocabulary masked out at one position
    ent = jax.jit(alg.entropy_from_logits)(*f32(logits, mask))
    want = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                row = [x for x in logits[b, t] if x != -np.inf]
                lse = max(row) + math.log(sum(math.exp(x - max(row)) for x in row))
                want[b, t] = -sum(math.exp(x - lse) * (x - lse) for x in row)
    np.testing.assert_allclose(ent, want, rtol=1e-5, atol=1e-6)

    def bonus(lg):
        return alg.entropy_bonus(alg.entropy_from_logits(lg, mask), mask, coef=0.01)[0]

    value, grad = jax.jit(jax.value_and_grad(bonus))(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(value, -0.01 * ref_aggregate(want, mask, "token_mean"), rtol=1e-5)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_loop_reference(estimator):
    rng = np.random.default_rng(11)
    mask = ragged_mask(rng)
    logp = -rng.exponential(1.0, (B, T))
    ref = logp + rng.normal(0, 0.5, (B, T))
    got = jax.jit(partial(alg.kl, estimator=estimator))(*f32(logp, ref), mask=jnp.asarray(mask))
    want = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                lr = logp[b, t] - ref[b, t]
                want[b, t] = {"k1": lr, "k2": 0.5 * lr**2, "k3": math.exp(-lr) - 1 + lr}[estimator]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    loss, metrics = alg.kl_loss(*f32(logp, ref, mask), coef=0.1, estimator=estimator)
    np.testing.assert_allclose(loss, 0.1 * ref_aggregate(want, mask, "token_mean"), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], want.sum() / mask.sum(), rtol=1e-5)
    penalty = alg.kl_reward_penalty(*f32(logp, ref, mask), coef=0.1, estimator=estimator)
    np.testing.assert_allclose(penalty, -0.1 * want, rtol=1e-5, atol=1e-7)


# --- advantages -----------------------------------------------------------------------------


def ref_gae(r, v, mask, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l} over the valid tokens of each row (closed form, no recursion)."""
    adv, ret = np.zeros_like(r), np.zeros_like(r)
    for b in range(r.shape[0]):
        idx = [t for t in range(r.shape[1]) if mask[b, t]]
        vals = [v[b, t] for t in idx] + [0.0]  # terminal value after the last valid token
        deltas = [r[b, t] + gamma * vals[k + 1] - vals[k] for k, t in enumerate(idx)]
        for k, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** j * deltas[k + j] for j in range(len(idx) - k))
            ret[b, t] = adv[b, t] + v[b, t]
    return adv, ret


def test_gae_matches_closed_form_reference():
    rng = np.random.default_rng(12)
    mask = ragged_mask(rng)
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    adv, ret = jax.jit(alg.gae)(*f32(rewards, values, mask), 0.97, 0.9)
    want_adv, want_ret = ref_gae(rewards, values, mask, 0.97, 0.9)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_left_and_right_padding_equal_unpadded():
    rng = np.random.default_rng(13)
    length, pad = 5, 4
    r, v = rng.normal(size=(1, length)), rng.normal(size=(1, length))
    want_adv, want_ret = alg.gae(*f32(r, v, np.ones((1, length))), 0.99, 0.95)
    garbage = np.full((1, pad), np.nan)
    for left in (True, False):
        cat = (
            (lambda x, g: np.concatenate([g, x], 1))
            if left
            else (lambda x, g: np.concatenate([x, g], 1))
        )
        m = cat(np.ones((1, length), bool), np.zeros((1, pad), bool))
        adv, ret = alg.gae(*f32(cat(r, garbage), cat(v, garbage), m), 0.99, 0.95)
        sl = slice(pad, None) if left else slice(0, length)
        np.testing.assert_allclose(adv[:, sl], want_adv, rtol=1e-6)
        np.testing.assert_allclose(ret[:, sl], want_ret, rtol=1e-6)
        assert np.all(np.asarray(adv)[~m] == 0) and np.all(np.asarray(ret)[~m] == 0)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_match_loop_reference(method):
    scores = np.random.default_rng(14).normal(size=12)
    group = 4
    got = jax.jit(partial(alg.group_advantages, group_size=group, method=method))(*f32(scores))
    want = []
    for k in range(0, 12, group):
        g = list(scores[k : k + group])
        for i, s in enumerate(g):
            if method == "grpo":
                want.append((s - statistics.mean(g)) / (statistics.stdev(g) + 1e-6))
            elif method == "dr_grpo":
                want.append(s - statistics.mean(g))
            else:
                want.append(s - statistics.mean(g[:i] + g[i + 1 :]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_group_size_errors_name_both_numbers():
    scores = jnp.zeros(6)
    with pytest.raises(ValueError, match=r"batch of 6 sequences is not divisible by group_size 4"):
        alg.group_advantages(scores, 4, "grpo")
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        alg.group_advantages(scores, 0, "grpo")
    with pytest.raises(ValueError, match="rloo needs group_size >= 2"):
        alg.group_advantages(scores, 1, "rloo")
    with pytest.raises(ValueError, match="method must be one of"):
        alg.group_advantages(scores, 2, "ppo")
    with pytest.raises(ValueError, match="not divisible by group_size 4"):
        alg.ADVANTAGE_ESTIMATORS.get("grpo")(jnp.zeros((6, 3)), jnp.ones((6, 3)), group_size=4)
    np.testing.assert_array_equal(alg.group_advantages(jnp.arange(3.0), 1, "grpo"), 0.0)


def test_reinforce_pp_matches_loop_reference():
    rng = np.random.default_rng(15)
    mask = ragged_mask(rng)
    rewards = rng.normal(size=(B, T)) * 0.1
    gamma = 0.9
    adv, ret = jax.jit(partial(alg.reinforce_pp_advantages, gamma=gamma))(*f32(rewards, mask))
    want_ret = np.zeros((B, T))
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        for k, t in enumerate(idx):
            want_ret[b, t] = sum(gamma**j * rewards[b, idx[k + j]] for j in range(len(idx) - k))
    flat = [want_ret[b, t] for b in range(B) for t in range(T) if mask[b, t]]
    mean, std = statistics.mean(flat), statistics.pstdev(flat)
    want_adv = np.where(mask, (want_ret - mean) / (std + 1e-6), 0.0)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-4, atol=1e-5)


def test_registered_estimators_share_one_signature():
    rng = np.random.default_rng(16)
    mask = ragged_mask(rng)
    mask[4, 0] = True  # every row of a group batch carries a response
    scores, values = f32(rng.normal(size=B), rng.normal(size=(B, T)))

    @jax.jit
    def run(scores, values, mask):
        rewards = alg.scores_to_token_rewards(scores, mask)
        out = {
            name: alg.ADVANTAGE_ESTIMATORS.get(name)(
                rewards, mask, values_bt=values, group_size=3, gamma=1.0, lam=0.95
            )
            for name in alg.ADVANTAGE_ESTIMATORS.names()
        }
        return out, alg.group_advantages(scores, 3, "grpo")

    out, grpo_b = run(scores, values, jnp.asarray(mask))
    for name, (adv, ret) in out.items():
        assert adv.shape == ret.shape == (B, T) and np.all(np.isfinite(adv)), name
        assert np.all(np.asarray(adv)[~mask] == 0), name
    want = np.where(mask, np.asarray(grpo_b)[:, None], 0)
    np.testing.assert_allclose(out["grpo"][0], want, rtol=1e-5)
    with pytest.raises(ValueError, match="needs values_bt"):
        alg.ADVANTAGE_ESTIMATORS.get("gae")(jnp.zeros((B, T)), jnp.asarray(mask))


def test_reward_shaping_helpers():
    rng = np.random.default_rng(17)
    mask = ragged_mask(rng)
    scores = rng.normal(size=B)
    placed = np.asarray(alg.scores_to_token_rewards(*f32(scores, mask)))
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        for t in range(T):
            want = scores[b] if valid and t == valid[-1] else 0.0
            assert placed[b, t] == pytest.approx(want, rel=1e-6)
    lengths = np.array([0, 10, 12, 15, 18, 20, 25])
    got = alg.overlong_penalty(jnp.asarray(lengths), max_length=20, buffer_length=8, penalty=0.5)
    want = []
    for n in lengths:
        if n <= 12:
            want.append(0.0)
        elif n <= 20:
            want.append(0.5 * (12 - n) / 8)
        else:
            want.append(-0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="buffer_length 30 and max_length 20"):
        alg.overlong_penalty(jnp.asarray(lengths), max_length=20, buffer_length=30)
    shaped = alg.scale_and_clip_rewards(
        jnp.asarray([-3.0, 0.5, 4.0]), scale=2.0, shift=1.0, clip=5.0
    )
    np.testing.assert_allclose(shaped, [-5.0, 2.0, 5.0])


# --- edge cases -----------------------------------------------------------------------------


def _all_losses(mode):
    kw = dict(aggregation=mode, norm_constant=8.0)

    def losses(lp, prox, behav, adv, mask):
        pol = dict(eps_clip=0.2, dual_clip=3.0, behaviour_weight_cap=2.0, **kw)
        return {
            "ppo": alg.ppo_actor_loss(lp, prox, behav, adv, mask, **pol),
            "gspo": alg.gspo_actor_loss(lp, prox, behav, adv, mask, **pol),
            "critic": alg.critic_loss(lp, prox, adv, mask, value_clip=0.2, **kw),
            "kl": alg.kl_loss(lp, prox, mask, estimator="k3", **kw),
            "entropy": alg.entropy_bonus(-lp, mask, coef=0.1, **kw),
        }

    return losses


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_all_masked_batch_gives_zero_loss_and_finite_gradients(mode):
    losses = _all_losses(mode)
    logp, prox, behav, adv, _ = policy_inputs(18)
    # Padding holds garbage: it must not reach any loss, metric or gradient.
    logp[:, -1], prox[:, -2], behav[:, -3], adv[:, -4] = 80.0, np.nan, -80.0, np.inf
    args = f32(logp, prox, behav, adv, np.zeros((B, T)))

    def total(lp):
        out = losses(lp, *args[1:])
        return sum(loss for loss, _ in out.values()), out

    (value, out), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(args[0])
    assert value == 0.0
    assert np.all(np.asarray(grad) == 0.0)
    for name, (loss, metrics) in out.items():
        assert loss == 0.0, name
        for key, metric in metrics.items():
            assert np.isfinite(metric), (name, key)


def test_padding_garbage_does_not_change_losses_or_gradients():
    losses = _all_losses("seq_mean_token_mean")
    logp, prox, behav, adv, mask = policy_inputs(19)
    dirty = [x.copy() for x in (logp, prox, behav, adv)]
    for x, junk in zip(dirty, (90.0, np.nan, -90.0, np.inf), strict=True):
        x[~mask] = junk

    def total(lp, *rest):
        return sum(loss for loss, _ in losses(lp, *rest).values())

    value_and_grad = jax.jit(jax.value_and_grad(total))
    clean_v, clean_g = value_and_grad(*f32(logp, prox, behav, adv, mask))
    dirty_v, dirty_g = value_and_grad(*f32(*dirty, mask))
    np.testing.assert_allclose(dirty_v, clean_v, rtol=1e-6)
    np.testing.assert_allclose(dirty_g, clean_g, rtol=1e-6, atol=1e-8)


def test_mismatched_shapes_raise_value_error_with_the_shapes():
    a, b = jnp.zeros((2, 5)), jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=r"logp_bt \(2, 5\).*mask_bt \(2, 4\)"):
        alg.ppo_actor_loss(a, a, None, a, b, eps_clip=0.2)
    with pytest.raises(ValueError, match=r"behaviour_logp_bt \(2, 4\)"):
        alg.gspo_actor_loss(a, a, b, a, a, eps_clip=0.2)
    with pytest.raises(ValueError, match=r"values_bt \(2, 5\).*mask_bt \(2, 4\)"):
        alg.gae(a, a, b, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"returns_bt \(2, 4\)"):
        alg.critic_loss(a, a, b, a)
    with pytest.raises(ValueError, match=r"ref_logp \(2, 4\)"):
        alg.kl(a, b, "k1")
    with pytest.raises(ValueError, match=r"2-D arrays.*\(5,\)"):
        alg.aggregate(jnp.zeros(5), jnp.zeros(5))
    with pytest.raises(ValueError, match=r"scores_b \[B\] and mask_bt \[B, T\]"):
        alg.scores_to_token_rewards(jnp.zeros(3), a)


def test_bad_hyperparameters_raise_value_error():
    a = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"dual_clip must be > 1, got 0\.5"):
        alg.ppo_actor_loss(a, a, None, a, a, eps_clip=0.2, dual_clip=0.5)
    with pytest.raises(ValueError, match="eps_clip must be in"):
        alg.ppo_actor_loss(a, a, None, a, a, eps_clip=1.5)
    with pytest.raises(ValueError, match="behaviour_weight_mode"):
        alg.ppo_actor_loss(a, a, a, a, a, eps_clip=0.2, behaviour_weight_mode="clip")
    with pytest.raises(ValueError, match="loss_type"):
        alg.critic_loss(a, a, a, a, loss_type="l1")
    with pytest.raises(ValueError, match="needs old_values_bt"):
        alg.critic_loss(a, None, a, a, value_clip=0.2)
    with pytest.raises(RegistryError, match="unknown loss aggregation 'token_sum'"):
        alg.aggregate(a, a, "token_sum")


# --- metadata and the aggregation resolver --------------------------------------------------

ESTIMATOR_KEYS = {"label", "needs_values", "group", "adv_norm", "aggregation", "norm_constant"}


def test_every_entry_describes_itself():
    labels = {}
    for name in alg.ADVANTAGE_ESTIMATORS:
        info = alg.ADVANTAGE_ESTIMATORS.info(name)
        assert set(info) >= ESTIMATOR_KEYS, name
        assert info["aggregation"] is None or info["aggregation"] in alg.LOSS_AGGREGATIONS
        labels[name] = info["label"]
    assert labels == {"gae": "PPO", "grpo": "GRPO", "dr_grpo": "Dr.GRPO", "rloo": "RLOO",
                      "reinforce_pp": "REINFORCE++"}  # fmt: skip
    needs = [
        n for n in alg.ADVANTAGE_ESTIMATORS if alg.ADVANTAGE_ESTIMATORS.info(n)["needs_values"]
    ]
    groups = [n for n in alg.ADVANTAGE_ESTIMATORS if alg.ADVANTAGE_ESTIMATORS.info(n)["group"]]
    assert needs == ["gae"] and groups == ["dr_grpo", "grpo", "rloo"]
    assert alg.POLICY_LOSSES.info("gspo")["aggregations"] == ("seq_mean_token_mean",)
    assert alg.POLICY_LOSSES.info("ppo")["aggregations"] is None
    seq = {n: alg.LOSS_AGGREGATIONS.info(n)["sequence_level"] for n in alg.LOSS_AGGREGATIONS}
    assert seq == {"token_mean": False, "seq_mean_token_mean": True, "seq_mean_token_sum": True,
                   "seq_mean_token_sum_norm": True}  # fmt: skip
    assert all("help" in alg.KL_ESTIMATORS.info(n) for n in alg.KL_ESTIMATORS)


@pytest.mark.parametrize(
    ("loss", "estimator", "loss_agg", "constant", "want"),
    [
        ("ppo", "gae", None, None, ("token_mean", None)),
        ("ppo", "grpo", None, None, ("token_mean", None)),
        # GSPO is sequence level by default (it used token_mean unless loss_agg was also set).
        ("gspo", "grpo", None, None, ("seq_mean_token_mean", None)),
        ("gspo", "dr_grpo", None, None, ("seq_mean_token_mean", None)),
        # Dr.GRPO divides by generation.max_new_tokens, not the padded prompt + response width.
        ("ppo", "dr_grpo", None, None, ("seq_mean_token_sum_norm", 512.0)),
        ("ppo", "dr_grpo", None, 100.0, ("seq_mean_token_sum_norm", 100.0)),
        ("ppo", "dr_grpo", "token_mean", None, ("token_mean", None)),
        ("ppo", "gae", "seq_mean_token_sum_norm", None, ("seq_mean_token_sum_norm", 512.0)),
        ("ppo", "rloo", "seq_mean_token_sum", 7.0, ("seq_mean_token_sum", None)),
        ("gspo", "gae", "seq_mean_token_mean", None, ("seq_mean_token_mean", None)),
    ],
)
def test_effective_loss_aggregation(loss, estimator, loss_agg, constant, want):
    assert alg.effective_loss_aggregation(loss, estimator, loss_agg, constant, 512) == want


def test_effective_loss_aggregation_rejects_contradictions():
    with pytest.raises(ValueError, match=r"loss_agg 'token_mean' contradicts .*'gspo'"):
        alg.effective_loss_aggregation("gspo", "grpo", "token_mean", None, 512)
    with pytest.raises(RegistryError, match=r"algorithm.loss_agg='token_sum'.*did you mean"):
        alg.effective_loss_aggregation("ppo", "grpo", "token_sum", None, 512)
    with pytest.raises(ValueError, match="norm_constant must be one of"):
        alg.register_advantage_estimator("x", lambda: 0, label="X", needs_values=False,
                                         group=False, norm_constant="T")  # fmt: skip
    with pytest.raises(ValueError, match="not among its allowed"):
        alg.register_policy_loss("y", lambda: 0, aggregation="token_mean",
                                 aggregations=("seq_mean_token_mean",))  # fmt: skip
    assert "x" not in alg.ADVANTAGE_ESTIMATORS and "y" not in alg.POLICY_LOSSES


# --- equal groups, clamped ratios, truncation -----------------------------------------------


def ref_group(scores, group, method, eps=1e-6):
    """float64 group advantages, one group at a time."""
    out = []
    for k in range(0, len(scores), group):
        g = np.asarray(scores[k : k + group], np.float64)
        if method == "grpo":
            out += list((g - g.mean()) / (g.std(ddof=1) + eps))
        elif method == "dr_grpo":
            out += list(g - g.mean())
        else:
            out += list(g - (g.sum() - g) / (group - 1))
    return np.asarray(out)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_equal_groups_give_exactly_zero(method):
    rng = np.random.default_rng(30)
    groups = [
        np.full(8, 0.97),  # float32 mean != 0.97: was ±0.106 for grpo
        np.full(8, 1 / 3),
        np.full(8, -12345.678),
        rng.normal(size=8),
        np.r_[np.full(7, 0.97), 0.1],
        rng.uniform(0, 1, 8).round(1),
    ]
    scores = np.concatenate(groups).astype(np.float32)
    got = np.asarray(jax.jit(partial(alg.group_advantages, group_size=8, method=method))(scores))
    for k in (0, 1, 2):
        assert np.all(got[8 * k : 8 * (k + 1)] == 0.0), (k, got[8 * k : 8 * (k + 1)])
    want = ref_group(scores.astype(np.float64), 8, method)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Through the registered estimator (scores on the last token of ragged rows) too.
    mask = np.ones((48, 3), bool)
    mask[::3, 2] = False
    rewards = np.asarray(alg.scores_to_token_rewards(jnp.asarray(scores), jnp.asarray(mask)))
    adv, _ = alg.ADVANTAGE_ESTIMATORS.get(method)(*f32(rewards, mask), group_size=8)
    assert np.all(np.asarray(adv)[:24] == 0.0)


def test_extreme_log_ratios_stay_finite_and_normal_ones_are_unchanged():
    logp, prox, behav, adv, mask = policy_inputs(31)
    far = logp.copy()
    far[0, :3] += 200.0  # |log r| = 200: exp overflowed in the forward, NaN in the backward
    far[1, :3] -= 200.0
    far_behav = prox.copy()
    far_behav[2, 1], far_behav[3, 1] = prox[2, 1] + 200.0, prox[3, 1] - 200.0
    for name in ("ppo", "gspo"):
        loss_fn = alg.POLICY_LOSSES.get(name)

        def total(lp, behav_, loss_fn=loss_fn):
            loss, metrics = loss_fn(lp, prox, behav_, adv, mask, eps_clip=0.2)
            return loss, metrics

        for lp, bh in ((far, behav), (logp, far_behav), (far, None)):
            (loss, metrics), grad = jax.value_and_grad(total, has_aux=True)(*f32(lp, bh))
            assert np.isfinite(loss) and np.all(np.isfinite(grad)), name
            assert all(np.isfinite(v) for v in metrics.values()), name
        assert float(metrics["ratio_max"]) == pytest.approx(np.exp(alg.LOG_RATIO_BOUND), rel=1e-5)
        # Inside the bound the clamp changes nothing: the loop reference is unclamped.
        moderate = prox + np.clip(logp - prox, -15, 15)
        got, _ = loss_fn(*f32(moderate, prox, behav, adv, mask), eps_clip=0.2)
        want, _ = ref_policy_loss(
            moderate, prox, behav, adv, mask, sequence_ratio=name == "gspo", eps_clip=0.2
        )
        np.testing.assert_allclose(got, want, rtol=1e-5)
    w, _ = alg.behaviour_weights(*f32(logp, far_behav, mask))
    assert np.all(np.isfinite(w)) and float(np.max(w)) <= np.exp(alg.LOG_RATIO_BOUND) * 1.0001


def test_k3_kl_stays_finite_at_extreme_log_ratios():
    """k3 = e^{-log ρ} - 1 + log ρ overflowed (inf loss, NaN gradient) for log ρ below -88."""
    logp = np.array([[-300.0, -5.0, -1.0, -2.0]], np.float32)  # log ρ = -299.9, ..., 0
    ref = np.array([[-0.1, -0.1, -1.2, -2.0]], np.float32)
    mask = np.ones_like(logp)

    def total(lp):
        return jnp.sum(alg.kl(lp, jnp.asarray(ref), "k3", mask=jnp.asarray(mask)))

    value, grad = jax.value_and_grad(total)(jnp.asarray(logp))
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    lr = np.clip(logp.astype(np.float64) - ref, -alg.LOG_RATIO_BOUND, alg.LOG_RATIO_BOUND)
    want = np.expm1(-lr) + lr  # NumPy float64, clamped as documented
    got = np.asarray(alg.kl(*f32(logp, ref), "k3"))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0, 3] == 0.0  # equal log-probs: exactly 0


def brute_force_gae(r, v, mask, gamma, lam, boot, boot_v=None):
    """Backward loop over each row's valid tokens; the value after the last one is V at the
    last token (or ``boot_v``) on bootstrapped rows, else 0."""
    adv, ret = np.zeros_like(r), np.zeros_like(r)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(mask[b])
        if not len(idx):
            continue
        next_v = 0.0
        if boot[b]:
            next_v = v[b, idx[-1]] if boot_v is None else boot_v[b]
        next_a = 0.0
        for t in idx[::-1]:
            delta = r[b, t] + gamma * next_v - v[b, t]
            next_a = delta + gamma * lam * next_a
            next_v = v[b, t]
            adv[b, t], ret[b, t] = next_a, next_a + v[b, t]
    return adv, ret


@pytest.mark.parametrize("mode", ["bootstrap", "terminal"])
def test_gae_truncation_matches_brute_force(mode):
    rng = np.random.default_rng(32)
    mask = ragged_mask(rng)
    r, v = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    truncated = np.array([True, False, True, True, True, False])
    boot = truncated if mode == "bootstrap" else np.zeros(B, bool)
    est = alg.ADVANTAGE_ESTIMATORS.get("gae")
    adv, ret = jax.jit(partial(est, gamma=0.97, lam=0.9))(
        *f32(r, mask), values_bt=jnp.asarray(v, jnp.float32), bootstrap_b=jnp.asarray(boot)
    )
    want_adv, want_ret = brute_force_gae(r, v, mask, 0.97, 0.9, boot)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    if mode == "terminal":  # no bootstrap at all == the terminal closed form
        np.testing.assert_allclose(adv, ref_gae(r, v, mask, 0.97, 0.9)[0], rtol=1e-5, atol=1e-5)
    else:  # a truncated row's last return includes γ·V at the cut
        last = np.flatnonzero(mask[0])[-1]
        assert np.asarray(ret)[0, last] == pytest.approx(r[0, last] + 0.97 * v[0, last], 1e-5)
    boot_v = rng.normal(size=B)
    adv, ret = alg.gae(*f32(r, v, mask), 0.97, 0.9, bootstrap_b=jnp.asarray(boot),
                       bootstrap_values_b=jnp.asarray(boot_v, jnp.float32))  # fmt: skip
    want_adv, want_ret = brute_force_gae(r, v, mask, 0.97, 0.9, boot, boot_v)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"bootstrap_b \[B\] and mask_bt \[B, T\]"):
        alg.gae(*f32(r, v, mask), 1.0, 1.0, bootstrap_b=jnp.zeros(B + 1, bool))
