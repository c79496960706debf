"""Steps on 4 forced CPU devices (data 1 × fsdp 2 × tensor 2) equal the single-device steps."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from interfaces_reference import TINY, max_abs_diff, random_sequences
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.interfaces import (
    ActorLossSpec,
    CriticLossSpec,
    actor_microbatch_loss,
    compute_logprobs,
    critic_microbatch_loss,
    init_train_state,
    pack_sequences,
    run_train_step,
)
from jaxrlhf.models import init_model, make_mesh
from jaxrlhf.optim import OptimizerSpec

# Vocabulary, heads, mlp and embed all divisible by 2: every axis really shards.
CFG = dataclasses.replace(TINY, vocab_size=128)
# Adam's first update is lr·g/(|g| + eps): where |g| ~ eps it turns rounding-level gradient
# differences into 1e-5 parameter differences. eps = 1e-6 keeps the test about sharding.
OPT = OptimizerSpec(lr=1e-3, eps=1e-6, grad_clip=0.5, weight_decay=0.01, warmup_steps=1)
SPEC = ActorLossSpec(eps_clip=0.2, kl_coef=0.05, entropy_coef=0.01, on_policy=False)


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) >= 4, "tests/conftest.py forces 4 CPU devices"
    return make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])


@pytest.fixture(scope="module")
def batch():
    ids, fields = random_sequences(seed=5, n=8, lo=6, hi=20, vocab=CFG.vocab_size)
    fields["old_logp"] = [x + 0.1 for x in fields["behaviour_logp"]]
    # rows_multiple=2: rows (and sequence slots) split over the fsdp axis.
    return pack_sequences(ids, fields, max_tokens_per_mb=40, rows_multiple=2)


def _steps(mb_loss, params, packed, spec, mesh, n=1):
    state = init_train_state(params, CFG, OPT, mesh=mesh)
    history = []
    for _ in range(n):
        state, metrics = run_train_step(
            mb_loss, state, packed, cfg=CFG, spec=spec, opt=OPT, mesh=mesh
        )
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def test_actor_step_sharded_equals_single_device(mesh, batch):
    single, m1 = _steps(actor_microbatch_loss, init_model(CFG, seed=3).params, batch, SPEC, None)
    sharded, m4 = _steps(
        actor_microbatch_loss, init_model(CFG, seed=3, mesh=mesh).params, batch, SPEC, mesh
    )
    embed = sharded.params["embed"].sharding
    assert isinstance(embed, NamedSharding) and embed.spec == P("tensor", "fsdp")
    mu = sharded.opt_state[1][0].mu["layers"]["gate"].sharding
    assert mu.spec == sharded.params["layers"]["gate"].sharding.spec  # moments follow params
    assert max_abs_diff(single.params, sharded.params) <= 1e-5
    for a, b in zip(m1, m4, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_logprobs_sharded_equal_single_device(mesh, batch):
    one = compute_logprobs(init_model(CFG, seed=4).params, CFG, batch, with_entropy=True)
    params = init_model(CFG, seed=4, mesh=mesh).params
    four = compute_logprobs(params, CFG, batch, with_entropy=True, mesh=mesh)
    assert four["logp"].sharding.spec == P(None, "fsdp", None)  # slots over the batch axes
    assert max_abs_diff(one, four) <= 1e-5


def test_critic_step_sharded_equals_single_device(mesh, batch):
    spec = CriticLossSpec(value_clip=0.2)
    critic = init_model(CFG, seed=6, value_head=True, lm_head=False)
    critic_sharded = init_model(CFG, seed=6, value_head=True, lm_head=False, mesh=mesh)
    single, m1 = _steps(critic_microbatch_loss, critic.params, batch, spec, None)
    sharded, m4 = _steps(critic_microbatch_loss, critic_sharded.params, batch, spec, mesh)
    assert max_abs_diff(single.params, sharded.params) <= 1e-5
    for a, b in zip(m1, m4, strict=True):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert np.isfinite(m4[-1]["explained_variance"])
