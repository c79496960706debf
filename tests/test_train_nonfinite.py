"""Non-finite train steps are skipped: a NaN / inf loss or gradient norm leaves the train state
bit-equal (params, optimizer moments, step count) and reports ``nonfinite_skipped`` = 1; the
next finite batch updates exactly as if the bad one had never come. Covers the shared
`apply_gradients` (gradient-norm and loss paths) and the actor and SFT steps through it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from interfaces_reference import TINY, random_sequences

from jaxrlhf.interfaces import (
    ActorLossSpec,
    actor_microbatch_loss,
    init_train_state,
    pack_sequences,
    run_train_step,
)
from jaxrlhf.interfaces.sft import SFTLossSpec, sft_microbatch_loss
from jaxrlhf.interfaces.state import TrainState
from jaxrlhf.interfaces.train import apply_gradients, losses_finite
from jaxrlhf.models import init_model
from jaxrlhf.optim import OptimizerSpec, lr_schedule, make_optimizer

OPT = OptimizerSpec(lr=1e-3, grad_clip=1.0, weight_decay=0.01)
SPEC = ActorLossSpec(kl_coef=0.1, entropy_coef=0.01, on_policy=True)
PACK = dict(max_tokens_per_mb=48, min_microbatches=4, min_slots=4)  # one shape: one compile


def host(state: TrainState) -> list[np.ndarray]:
    """Every leaf of the state (params, moments, counts, step) copied to the host."""
    return [np.array(x) for x in jax.tree.leaves(state)]


def assert_bit_equal(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes()  # bit for bit (NaN / inf included)


def toy_state() -> tuple[TrainState, tuple]:
    """A two-leaf state, its optimizer and its schedule."""
    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "norm": jnp.ones(3)}
    tx = make_optimizer(OPT)
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32)), (tx, lr_schedule(OPT))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_apply_gradients_skips_a_non_finite_gradient(bad: float) -> None:
    state, (tx, schedule) = toy_state()
    before = host(state)
    grads = {"w": jnp.ones((2, 3)).at[1, 2].set(bad), "norm": jnp.ones(3)}
    new, m = jax.jit(apply_gradients, static_argnums=(2, 3))(
        state, grads, tx, schedule, jnp.asarray(False)
    )
    assert_bit_equal(host(new), before)
    assert float(m["nonfinite_skipped"]) == 1.0 and float(m["update_skipped"]) == 1.0
    assert not np.isfinite(float(m["grad_norm"]))  # the bad value is reported, not hidden


def test_apply_gradients_skips_a_non_finite_loss_and_updates_a_finite_one() -> None:
    state, (tx, schedule) = toy_state()
    before = host(state)
    grads = {"w": jnp.full((2, 3), 0.5), "norm": jnp.ones(3)}
    step = jax.jit(apply_gradients, static_argnums=(2, 3))
    new, m = step(state, grads, tx, schedule, jnp.asarray(False), jnp.asarray(False))
    assert_bit_equal(host(new), before)
    assert float(m["nonfinite_skipped"]) == 1.0 and float(m["update_skipped"]) == 1.0

    new, m = step(state, grads, tx, schedule, jnp.asarray(False), jnp.asarray(True))
    assert float(m["nonfinite_skipped"]) == 0.0 and float(m["update_skipped"]) == 0.0
    assert int(new.step) == 1
    # First AdamW step (NumPy): clip to norm 1, then m̂ / (sqrt(v̂) + eps) = sign(g), plus decay.
    g = np.full((2, 3), 0.5) / max(1.0, np.sqrt(6 * 0.25 + 3) / OPT.grad_clip)
    w = np.arange(6, dtype=np.float64).reshape(2, 3)
    want = w - OPT.lr * (g / (np.abs(g) + OPT.eps) + OPT.weight_decay * w)
    np.testing.assert_allclose(np.asarray(new.params["w"]), want, rtol=1e-6, atol=1e-8)

    # No loss tokens is a skip, but not a non-finite one.
    _, m = step(state, grads, tx, schedule, jnp.asarray(True), jnp.asarray(True))
    assert float(m["nonfinite_skipped"]) == 0.0 and float(m["update_skipped"]) == 1.0


def test_losses_finite_reads_only_the_loss_metrics() -> None:
    ok = {"loss": jnp.float32(1.0), "value_loss": jnp.float32(2.0), "ratio_max": jnp.inf}
    assert bool(losses_finite(ok))
    assert not bool(losses_finite(ok | {"kl_loss": jnp.float32(np.nan)}))
    assert bool(losses_finite({"tokens": jnp.float32(3.0)}))  # no loss metric: nothing to refuse


@pytest.fixture(scope="module")
def actor_batches():
    ids, fields = random_sequences(seed=5, n=6, lo=5, hi=20)
    fields = {k: fields[k] for k in ("loss_mask", "advantages", "ref_logp")}
    good = pack_sequences(ids, fields, **PACK)
    bad = {}
    for value in (np.nan, np.inf):
        adv = [a.copy() for a in fields["advantages"]]
        adv[0][-1] = value  # a scored token (the last one is always scored in sequence 0)
        bad[value] = pack_sequences(ids, fields | {"advantages": adv}, **PACK)
    return good, bad


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_actor_step_with_non_finite_advantages_is_skipped(actor_batches, value: float) -> None:
    good, bad = actor_batches
    params = init_model(TINY, seed=0).params
    run = lambda state, packed: run_train_step(
        actor_microbatch_loss, state, packed, cfg=TINY, spec=SPEC, opt=OPT
    )
    state = init_train_state(jax.tree.map(jnp.copy, params), TINY, OPT)
    before = host(state)
    state, m = run(state, bad[value])
    assert_bit_equal(host(state), before)
    assert float(m["nonfinite_skipped"]) == 1.0 and float(m["update_skipped"]) == 1.0
    assert not np.isfinite(float(m["loss"]))

    # The next finite batch updates exactly like a fresh state that never saw the bad one.
    state, m = run(state, good)
    assert float(m["nonfinite_skipped"]) == 0.0 and float(m["update_skipped"]) == 0.0
    assert int(state.step) == 1
    fresh, m_ref = run(init_train_state(jax.tree.map(jnp.copy, params), TINY, OPT), good)
    assert_bit_equal(host(state), host(fresh))
    assert float(m["loss"]) == float(m_ref["loss"])


def test_sft_step_with_a_poisoned_param_is_skipped() -> None:
    params = init_model(TINY, seed=3).params
    params["final_norm"] = params["final_norm"].at[0].set(jnp.inf)  # logits -> NaN / inf
    ids, fields = random_sequences(seed=7, n=4, lo=5, hi=16)
    packed = pack_sequences(ids, {"loss_mask": fields["loss_mask"]}, max_tokens_per_mb=48)
    state = init_train_state(params, TINY, OPT)
    before = host(state)
    state, m = run_train_step(
        sft_microbatch_loss, state, packed, cfg=TINY, spec=SFTLossSpec(), opt=OPT
    )
    assert_bit_equal(host(state), before)
    assert float(m["nonfinite_skipped"]) == 1.0 and float(m["update_skipped"]) == 1.0


class Poison:
    """Wraps an MFC implementation: its ``train`` sees ``field`` NaN in the rows ``rows``."""

    def __init__(self, impl, field: str, rows):
        self.impl, self.field, self.rows = impl, field, rows

    def __getattr__(self, interface_type):
        method = getattr(self.impl, interface_type)
        if interface_type != "train":
            return method

        def call(ctx, mfc, data):
            poisoned = [np.array(x, np.float32) for x in data[self.field]]
            for i in self.rows(len(poisoned)):
                poisoned[i][-1] = np.nan  # the last response token is always scored
            return method(ctx, mfc, {**data, self.field: poisoned})

        return call


def test_ppo_step_reports_skipped_updates_per_role(tmp_path) -> None:
    """Through the coordinator: every actor update poisoned -> ``actor/nonfinite_skipped`` 1
    and the actor state bit-equal; one critic minibatch of two poisoned -> ``critic/...`` 0.5
    (the epoch loop's mean over updates, so any skipped update shows as > 0)."""
    from toy import toy_config

    from jaxrlhf.system.coordinator import PPOCoordinator

    cfg = toy_config(
        tmp_path, "sft_warmup.steps=0", "experiment.total_steps=1", "data.batch_size=4",
        "generation.n_samples=2", "algorithm.advantage_estimator=gae", "critic.enabled=true",
        "ref.enabled=false", "algorithm.n_minibatches=2",
    )  # fmt: skip
    coordinator = PPOCoordinator(cfg)
    impls = coordinator.impls
    impls["actor_train"] = Poison(impls["actor_train"], "advantages", range)
    impls["critic_train"] = Poison(impls["critic_train"], "returns", lambda n: [0])
    actor_before = host(coordinator.models.actor)
    critic_step = int(coordinator.models.critic.step)
    metrics = coordinator.train_step()
    assert metrics["actor/nonfinite_skipped"] == 1.0 and metrics["actor/update_skipped"] == 1.0
    assert_bit_equal(host(coordinator.models.actor), actor_before)
    assert metrics["critic/nonfinite_skipped"] == 0.5
    assert int(coordinator.models.critic.step) == critic_step + 1  # the clean minibatch updated
