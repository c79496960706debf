"""Checkpoints: round trip of every kind of train state, keep-last-N + keep-best, resharding on
restore, HF export, and a process killed in the middle of an asynchronous save.

Run as a script (``python test_checkpoint.py kill-child DIR``) it is the child that gets killed.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.checkpoint import (
    Checkpointer,
    CheckpointNotFoundError,
    HostState,
    abstract_like,
)
from jaxrlhf.config import CheckpointConfig
from jaxrlhf.models import TransformerConfig, from_pretrained, init_model, make_mesh
from jaxrlhf.models import param_shardings as model_shardings

TINY = TransformerConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_heads=4,
    num_kv_heads=2,
    num_layers=2,
)


@pytest.fixture(scope="module")
def model():
    return init_model(TINY, seed=1)  # compiled once: initialisation dominates these tests


def assert_trees_equal(a, b) -> None:
    """Same structure, dtypes and bits (typed PRNG keys compared through their key data)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


def train_state(params, seed: int = 0) -> dict:
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    # Every optimizer leaf moved off its initial value, so the round trip means something.
    opt_state = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, opt.init(p)))(params)
    return {
        "actor": {"params": params, "opt_state": opt_state},
        "critic": None,
        "rng": jax.random.key(seed),
    }


def test_round_trip_restores_every_part_exactly(tmp_path, model):
    state = train_state(model.params, seed=7)
    host = HostState(
        data_state={"version": 1, "fingerprint": "ab", "grain": {"next_index": 3}},
        metric_history=[{"step": 1, "loss": np.float32(0.1)}, {"step": 2, "loss": math.nan}],
        config="experiment:\n  name: t\n",
        extra={"policy_version": 2},
    )
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), max_to_keep=2)
    with Checkpointer(cfg) as ckpt:
        assert ckpt.maybe_restore(abstract_like(state)) is None
        assert ckpt.save(2, state, host)
        assert not ckpt.save(2, state, host)  # a step is written once
    ckpt = Checkpointer(cfg)
    got = ckpt.maybe_restore(abstract_like(state))
    assert got.step == 2
    assert_trees_equal(got.state, state)
    assert got.host.metric_history[0] == {"step": 1, "loss": float(np.float32(0.1))}
    assert math.isnan(got.host.metric_history[1]["loss"])
    assert (got.host.data_state, got.host.config, got.host.extra) == (
        host.data_state,
        host.config,
        host.extra,
    )
    raw = ckpt.restore()  # no target: the saved structure as nested containers
    assert np.array_equal(raw.state["actor"]["params"]["embed"], state["actor"]["params"]["embed"])
    with pytest.raises(CheckpointNotFoundError, match="no complete step 5"):
        ckpt.restore(step=5)
    ckpt.close()
    no_resume = Checkpointer(CheckpointConfig(dir=cfg.dir, resume=False))
    assert no_resume.maybe_restore() is None
    no_resume.close()


def test_keeps_last_n_and_the_best(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path), max_to_keep=2, save_every=2)
    state = {"w": jnp.arange(3.0)}
    rewards = {2: 0.1, 4: 0.9, 6: 0.3, 8: 0.2, 10: 0.4}
    with Checkpointer(cfg, keep_best_metric="eval/reward") as ckpt:
        assert [s for s in range(1, 11) if ckpt.should_save(s, total_steps=11)] == [2, 4, 6, 8, 10]
        assert ckpt.should_save(11, total_steps=11)
        for step, r in rewards.items():
            ckpt.save(step, {"w": state["w"] + step}, metrics={"eval/reward": r})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 8, 10] and ckpt.best_step() == 4
        assert ckpt.restore(step=4).state["w"].tolist() == [4.0, 5.0, 6.0]
    with Checkpointer(cfg, keep_best_metric="loss", best_mode="min") as ckpt:
        ckpt.save(12, state, metrics={"loss": 5.0})
        ckpt.save(14, state, metrics={"loss": 7.0})
        ckpt.save(16, state, metrics={"loss": 6.0})
        ckpt.wait()
        assert ckpt.all_steps() == [12, 14, 16] and ckpt.best_step() == 12


def test_sharded_save_restores_onto_other_meshes_and_one_device(tmp_path, model):
    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    state = train_state(jax.device_put(model.params, model_shardings(TINY, mesh)))
    wq = state["actor"]["params"]["layers"]["q"]
    assert len(wq.sharding.device_set) == 4 and not wq.sharding.is_fully_replicated
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        ckpt.save(1, state)
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path)))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for target_mesh in (make_mesh(data=1, fsdp=4, tensor=1), None):
        params_sh = model_shardings(TINY, target_mesh)
        opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
        opt_abstract = jax.eval_shape(opt.init, state["actor"]["params"])
        opt_sh = optax.tree_map_params(opt, lambda _, s: s, opt_abstract, params_sh)
        opt_sh = jax.tree.map(lambda s: s if isinstance(s, jax.sharding.Sharding) else one, opt_sh)
        target = {
            "actor": {
                "params": abstract_like(state["actor"]["params"], params_sh),
                "opt_state": abstract_like(opt_abstract, opt_sh),
            },
            "critic": None,
            "rng": abstract_like(state["rng"], one),
        }
        got = ckpt.restore(target).state
        assert_trees_equal(got, state)
        got_wq = got["actor"]["params"]["layers"]["q"]
        assert got_wq.sharding == params_sh["layers"]["q"]
    ckpt.close()


def test_export_hf_loads_back(tmp_path, model):
    with Checkpointer(CheckpointConfig(dir=str(tmp_path / "run" / "checkpoints"))) as ckpt:
        out = ckpt.export_hf(model)
    assert out == str((tmp_path / "run" / "hf_actor").absolute())
    assert json.loads((Path(out) / "config.json").read_text())["hidden_size"] == 32
    assert_trees_equal(from_pretrained(out).params, model.params)


# ----------------------------------------------------------------------------- SIGKILL mid-save


def _kill_child(directory: str) -> None:
    """Save step 1, then start an async save of a 32 MB step 2 and wait to be killed."""
    import asyncio

    import orbax.checkpoint as ocp

    ckpt = Checkpointer(CheckpointConfig(dir=directory))
    ckpt.save(1, {"w": jnp.full((8, 1024, 1024), 1.0, jnp.float32)})
    ckpt.wait()
    # Hold the commit (the rename of the temporary directory) open, so that the kill always
    # lands inside the save however fast the disk is.
    rename = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self):
        await asyncio.sleep(600)
        await rename(self)

    ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
    ckpt.save(2, {"w": jnp.full((8, 1024, 1024), 2.0, jnp.float32)})
    print("SAVING", flush=True)
    time.sleep(600)


def test_sigkill_during_async_save_resumes_from_previous_step(tmp_path):
    directory = tmp_path / "ckpt"
    child = subprocess.Popen(
        [sys.executable, __file__, "kill-child", str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "SAVING"
        deadline = time.monotonic() + 60
        while not list(directory.glob("2.*tmp*")) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert list(directory.glob("2.*tmp*")) and not (directory / "2").exists()
    target = {"w": jax.ShapeDtypeStruct((8, 1024, 1024), jnp.float32)}
    target = abstract_like(target, {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])})
    with Checkpointer(CheckpointConfig(dir=str(directory))) as ckpt:
        got = ckpt.maybe_restore(target)
        assert got.step == 1 and ckpt.all_steps() == [1]
        assert float(got.state["w"][0, 0, 0]) == 1.0
        assert ckpt.save(2, {"w": jnp.full((2,), 3.0)})  # the step is free again
    assert not list(directory.glob("*tmp*"))
    with Checkpointer(CheckpointConfig(dir=str(directory))) as ckpt:
        assert ckpt.latest_step() == 2 and ckpt.restore().state["w"].tolist() == [3.0, 3.0]


if __name__ == "__main__" and sys.argv[1:2] == ["kill-child"]:
    _kill_child(sys.argv[2])
