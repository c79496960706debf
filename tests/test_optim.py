"""`jaxrlhf.optim` against NumPy references written as explicit per-step loops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.optim import OptimizerSpec, lr_schedule, make_optimizer, weight_decay_mask


def ref_lr(cfg: OptimizerSpec, total: int, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    frac = min(max((step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 0.0), 1.0)
    low = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return low + (cfg.lr - low) * (1 + math.cos(math.pi * frac)) / 2
    return cfg.lr - (cfg.lr - low) * frac


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_match_reference(schedule, warmup):
    cfg = OptimizerSpec(lr=2e-3, warmup_steps=warmup, schedule=schedule, min_lr_ratio=0.1)
    fn = lr_schedule(cfg, total_steps=12)
    for step in range(16):
        assert float(fn(step)) == pytest.approx(ref_lr(cfg, 12, step), rel=1e-6), step
    if warmup:
        assert float(fn(0)) > 0 and float(fn(warmup - 1)) == pytest.approx(cfg.lr)
    if schedule != "constant":
        assert float(fn(12)) == pytest.approx(cfg.lr * 0.1, rel=1e-6)


def test_decay_needs_total_steps():
    with pytest.raises(ValueError, match="needs total_steps"):
        lr_schedule(OptimizerSpec(schedule="cosine"))
    lr_schedule(OptimizerSpec(schedule="constant"))  # fine without


def _params(rng):
    return {
        "embed": rng.normal(size=(5, 3)),
        "final_norm": 1 + 0.1 * rng.normal(size=(3,)),
        "layers": {"q": rng.normal(size=(2, 3, 4)), "q_bias": rng.normal(size=(2, 4))},
        "value_head": {"kernel": rng.normal(size=(3,)), "bias": np.asarray(0.5)},
    }


def test_weight_decay_mask():
    mask = weight_decay_mask(_params(np.random.default_rng(0)))
    assert mask == {
        "embed": True,
        "final_norm": False,
        "layers": {"q": True, "q_bias": False},
        "value_head": {"kernel": True, "bias": False},
    }


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_adamw_matches_numpy_loop(grad_clip):
    cfg = OptimizerSpec(
        lr=1e-2,
        weight_decay=0.1,
        betas=(0.8, 0.95),
        eps=1e-6,
        grad_clip=grad_clip,
        warmup_steps=2,
        schedule="cosine",
        min_lr_ratio=0.2,
    )
    total = 6
    rng = np.random.default_rng(1)
    params = _params(rng)
    grads = [jax.tree.map(lambda p: rng.normal(size=np.shape(p)), params) for _ in range(total)]

    # Reference: flat per-leaf loops in float64.
    names, leaves = zip(*jax.tree_util.tree_flatten_with_path(params)[0], strict=True)
    ref = [np.array(x, np.float64) for x in leaves]
    decays = [not str(n[-1].key).endswith(("norm", "bias")) for n in names]
    m = [np.zeros_like(x) for x in ref]
    v = [np.zeros_like(x) for x in ref]
    for t, g_tree in enumerate(grads):
        g = [np.array(x, np.float64) for x in jax.tree.leaves(g_tree)]
        if grad_clip is not None:
            norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
            g = [x * min(1.0, grad_clip / norm) for x in g]
        lr = ref_lr(cfg, total, t)
        b1, b2 = cfg.betas
        for i in range(len(ref)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            m_hat = m[i] / (1 - b1 ** (t + 1))
            v_hat = v[i] / (1 - b2 ** (t + 1))
            step = m_hat / (np.sqrt(v_hat) + cfg.eps)
            if decays[i]:
                step = step + cfg.weight_decay * ref[i]
            ref[i] = ref[i] - lr * step

    tx = make_optimizer(cfg, total_steps=total)
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
        p = jax.tree.map(jnp.add, p, updates)
    for got, want in zip(jax.tree.leaves(p), ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)
