"""Resume diamond on a stand-in training loop: N steps straight == k steps, process exit,
resume, N − k steps — bitwise-equal params, optimizer state, RNG key, metric history and the
prompts seen (the data stream crosses epoch boundaries before and after the stop).

The loop has every piece a real trainer checkpoints: a model from `init_model`, an optax
optimizer, a prompt-pipeline iterator, an RNG key consumed every step, a metric history and the
config. Run as a script (``python test_checkpoint_resume.py legs A B OUT``) it does the straight
run (in A) and the first leg (k steps in B), then exits; the test process resumes B.
"""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf.checkpoint import Checkpointer, HostState, abstract_like
from jaxrlhf.config import CheckpointConfig, Config, DataConfig, config_to_yaml
from jaxrlhf.data.pipeline import build_prompt_pipeline, load_tokenizer
from jaxrlhf.models import TransformerConfig, forward_logits, init_model

N_STEPS, STOP_AT = 7, 3
DATA = DataConfig(batch_size=4, max_prompt_len=8)  # toy task, 10 prompts: 2.5 steps per epoch
MODEL = TransformerConfig(
    model_type="llama", vocab_size=80, hidden_size=32, intermediate_size=64, num_layers=1
)
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=0.01))


def loss_fn(params, ids_bt, mask_bt, key):
    """Next-token loss on the prompt tokens, with a random token drop-out that uses the key."""
    keep_bt = jax.random.bernoulli(key, 0.8, mask_bt.shape) * mask_bt
    logits_btv = forward_logits(params, MODEL, ids_bt, mask_bt)
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1])
    target_logp_bt = jnp.take_along_axis(logp_btv, ids_bt[:, 1:, None], axis=-1)[..., 0]
    weight_bt = keep_bt[:, 1:] * mask_bt[:, :-1]
    return -(target_logp_bt * weight_bt).sum() / jnp.maximum(weight_bt.sum(), 1)


@functools.partial(jax.jit, donate_argnums=0)  # donated right after an async save
def train_step(state, ids_bt, mask_bt):
    key, sub = jax.random.split(state["rng"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], ids_bt, mask_bt, sub)
    updates, opt_state = OPTIMIZER.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return {"params": params, "opt_state": opt_state, "rng": key}, metrics


def initial_state() -> dict:
    params = init_model(MODEL, seed=0).params
    state = {"params": params, "opt_state": OPTIMIZER.init(params), "rng": jax.random.key(11)}
    # Committed to one device like the step's outputs, so the step compiles once.
    return jax.device_put(state, jax.devices()[0])


def run(ckpt_dir: str, stop_after: int | None = None, fresh: dict | None = None):
    """The trainer: resume if a checkpoint exists, step to N (or ``stop_after``), save each step.

    ``fresh``: the initial state when not resuming (default: `initial_state()`); it is donated.
    Returns the final state, the metric history and the prompts this call consumed.
    """
    tok = load_tokenizer(None)
    data = build_prompt_pipeline(DATA, tok, seed=5, task_size=10).iterator()
    ckpt = Checkpointer(CheckpointConfig(dir=ckpt_dir, save_every=1, max_to_keep=2))
    # The restore target is abstract: a resumed run never builds a state only to overwrite it.
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = abstract_like(jax.eval_shape(initial_state), one_device)
    restored = ckpt.maybe_restore(target)
    if restored is None:
        state, start, history = fresh or initial_state(), 0, []
    else:
        state, start, history = restored.state, restored.step, restored.host.metric_history
        data.set_state(restored.host.data_state)
    seen: list[str] = []
    config_yaml = config_to_yaml(Config(data=DATA))
    for step in range(start + 1, N_STEPS + 1):
        batch = next(data)
        seen += batch.prompts
        state, metrics = train_step(state, batch.input_ids_bt, batch.attention_mask_bt)
        history.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
        if ckpt.should_save(step, N_STEPS):
            host = HostState(
                data_state=data.get_state(), metric_history=history, config=config_yaml
            )
            ckpt.save(step, state, host)
        if step == stop_after:
            break
    ckpt.close()
    return state, history, seen


def flat_bits(state: dict) -> list[np.ndarray]:
    leaves = jax.tree.leaves({**state, "rng": jax.random.key_data(state["rng"])})
    return [np.asarray(x) for x in leaves]


def test_resume_after_process_exit_is_bitwise_exact(tmp_path):
    straight_dir, resumed_dir, out = tmp_path / "straight", tmp_path / "resumed", tmp_path / "o"
    # One child process runs both the straight run and the first leg, then exits.
    cmd = [sys.executable, __file__, "legs", str(straight_dir), str(resumed_dir), str(out)]
    subprocess.run(cmd, check=True, timeout=300)
    legs = json.loads(out.read_text())
    assert Checkpointer(CheckpointConfig(dir=str(resumed_dir))).latest_step() == STOP_AT

    resumed, history, seen = run(str(resumed_dir))  # this process: resume, N − k steps

    straight_ckpt = Checkpointer(CheckpointConfig(dir=str(straight_dir)))
    straight = straight_ckpt.restore(abstract_like(resumed), step=N_STEPS)
    assert legs["part1_seen"] + seen == legs["straight_seen"]
    assert len(seen) + len(legs["part1_seen"]) == N_STEPS * DATA.batch_size > 2 * 10  # 2 epochs
    assert history == legs["straight_history"] == straight.host.metric_history
    assert history[:STOP_AT] == legs["part1_history"] and len(history) == N_STEPS
    assert jax.tree.structure(resumed) == jax.tree.structure(straight.state)
    for a, b in zip(flat_bits(resumed), flat_bits(straight.state), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    first = straight_ckpt.restore(abstract_like(resumed), step=N_STEPS - 1).state
    assert not all(
        np.array_equal(a, b) for a, b in zip(flat_bits(first), flat_bits(resumed), strict=True)
    )


if __name__ == "__main__" and sys.argv[1:2] == ["legs"]:
    init = initial_state()  # built once; each run gets its own copy (the step donates it)
    copy = lambda: jax.tree.map(jnp.copy, init)
    _, straight_history, straight_seen = run(sys.argv[2], fresh=copy())
    _, part1_history, part1_seen = run(sys.argv[3], stop_after=STOP_AT, fresh=copy())
    with open(sys.argv[4], "w") as f:
        json.dump(
            {
                "straight_history": straight_history,
                "straight_seen": straight_seen,
                "part1_history": part1_history,
                "part1_seen": part1_seen,
            },
            f,
        )
