"""Asynchronous PPO end to end on the toy task (tiny shapes): η = 0 equals sync, staleness and
exactly-once under a slow trainer, interrupted requests keep exact per-version log-probs."""

import time

import jax
import numpy as np
import pytest
from toy import toy_config

from jaxrlhf.config import ConfigError
from jaxrlhf.generation.server import GenerationServer
from jaxrlhf.generation.types import SamplingParams
from jaxrlhf.models import ModelHandle, init_model
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.rewards.base import REWARDS
from jaxrlhf.system.async_ppo import parse_allocation
from jaxrlhf.system.async_rollout import group_trajectories
from jaxrlhf.system.coordinator import PPOCoordinator

TINY = [
    "data.batch_size=4", "data.eval_size=8", "generation.n_samples=2",
    "generation.max_new_tokens=6", "sft_warmup.steps=2", "sft_warmup.batch_size=4",
    "checkpoint.save_every=0",
    "generation.decode_chunk=2", "generation.max_concurrent=8",
    "algorithm.decoupled_loss=true", "algorithm.behav_imp_weight_cap=5.0",
    "reward.fn=test_async_digits",
]  # fmt: skip


@REWARDS.register("test_async_digits")
def digits_reward(response: str, answer: str | None = None) -> float:
    """A dense reward an untrained policy already varies on, so every update moves the params."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


def _config(tmp_path, *extra):
    return toy_config(tmp_path, *TINY, *extra)


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]


def test_eta_zero_reproduces_sync(tmp_path):
    """Same seed, η = 0: the async run makes the same updates as ``mode: sync``."""
    steps = 3
    sync = PPOCoordinator(_config(tmp_path / "s"))
    sync_metrics = [sync.train_step() for _ in range(steps)]
    cfg = _config(tmp_path / "a", "experiment.mode=async", "async_ppo.allocation=gen=2,train=2")
    coord = PPOCoordinator(cfg)
    try:
        async_metrics = [coord.train_step() for _ in range(steps)]
    finally:
        coord.close()
    assert {d.id for d in coord.mesh.devices.flat}.isdisjoint(
        d.id for d in coord.generation.gen_mesh.devices.flat
    )
    for s, a in zip(sync_metrics, async_metrics, strict=True):
        assert a["async/staleness_max"] == 0.0
        for key in ("reward/mean", "response_len/mean", "actor/loss", "actor/grad_norm"):
            np.testing.assert_allclose(a[key], s[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert sync_metrics[-1]["actor/grad_norm"] > 0  # the updates are not trivially zero
    for x, y in zip(_leaves(coord.models.actor.params), _leaves(sync.models.actor.params),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(x, y, atol=2e-5)


class SlowDecodeServer(GenerationServer):
    """Decode chunks that take a while, so weight updates land inside requests."""

    def _decode(self, done):
        time.sleep(0.01)
        super()._decode(done)


def test_slow_generator_fast_trainer_bounds_staleness_and_keeps_versions(tmp_path):
    """η = 2 with a generator slower than the trainer: every batch is within η, no group is
    used twice or lost, and each token's behaviour log-prob is the log-prob under the version
    of the weights that produced it (recomputed from snapshots of every published version)."""
    eta, steps = 2, 6
    cfg = _config(tmp_path, "experiment.mode=async", f"experiment.max_head_offpolicyness={eta}",
                  "async_ppo.allocation=gen=1,train=3", "async_ppo.proximal=fused")  # fmt: skip
    snapshots = {}

    class Recording(SlowDecodeServer):
        def update_weights(self, params, version, **kw):
            snapshots[version] = jax.device_get(params)
            super().update_weights(params, version, **kw)

    # Build with the default server, then swap in the recording one on the same gen mesh.
    coord = PPOCoordinator(cfg)
    coord.generation.server.close()
    snapshots[0] = jax.device_get(coord.models.actor.params)
    handle = ModelHandle(
        coord.models.actor_cfg, coord.models.actor.params, coord.generation.gen_mesh
    )
    coord.generation.server = Recording(
        handle, max_slots=8, max_seq_len=22, decode_chunk=1,
        eos_token_id=coord.tokenizer.eos_token_id, seed=0,
    )  # fmt: skip
    used, lags, mixed, checked = [], [], 0, 0
    try:
        for _ in range(steps):
            version = coord.version
            metrics = coord.train_step()
            assert metrics["async/staleness_max"] <= eta
            lags += [version - v for v in coord.generation.consumed_min_versions]
            used += coord.generation.consumed_uids
            traj = coord.last_trajectories
            rows = (traj.input_ids, traj.response_mask, traj.behav_logprobs, traj.versions)
            for ids, mask, behav, vers in zip(*rows, strict=True):
                resp = mask > 0
                mixed += len(set(vers[resp].tolist())) > 1
                for v in set(vers[resp].tolist()):
                    handle_v = ModelHandle(coord.models.actor_cfg, snapshots[v], None)
                    logits = np.asarray(handle_v.logits(ids[None]))[0]
                    logp = jax.nn.log_softmax(logits[:-1], axis=-1)
                    recomputed = np.asarray(logp)[np.arange(len(ids) - 1), ids[1:]]
                    at = resp & (vers == v)
                    np.testing.assert_allclose(behav[at], recomputed[at[1:]], atol=2e-5)
                    checked += int(at.sum())
    finally:
        coord.close()
    assert max(lags) <= eta and max(lags) > 0  # the generator did run behind
    assert len(used) == len(set(used)) == steps * cfg.data.batch_size
    assert set(range((steps - eta) * cfg.data.batch_size)) <= set(used)
    assert mixed > 0 and checked > 0  # some requests spanned a weight update


def test_request_spanning_a_weight_update_has_two_versions():
    """Interruptible generation: tokens before the update come from v0, after it from v1, and
    each behaviour log-prob matches its own version's weights (not the other's)."""
    cfg = TransformerConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=1,
                            num_heads=2, num_kv_heads=1, initializer_range=0.3)  # fmt: skip
    m0, m1 = init_model(cfg, seed=0), init_model(cfg, seed=1)
    server = GenerationServer(m0, max_slots=2, max_seq_len=24, decode_chunk=3, threaded=False)
    handle = server.submit([3, 4, 5], SamplingParams(max_new_tokens=9, temperature=1.0, seed=7))
    server.step()  # prefill + first chunk under v0
    server.update_weights(m1.params, 1)
    server.run_until_idle()
    out = handle.result()
    traj = group_trajectories(np.asarray([3, 4, 5]), out, "p", "a", _Chars())
    ids, vers, behav = traj.input_ids[0], traj.versions[0], traj.behav_logprobs[0]
    assert vers[3:].tolist() == [0] * 3 + [1] * 6
    per_version = {}
    for v, model in ((0, m0), (1, m1)):
        logp = jax.nn.log_softmax(np.asarray(model.logits(ids[None]))[0, :-1], axis=-1)
        per_version[v] = np.asarray(logp)[np.arange(len(ids) - 1), ids[1:]]
    for v in (0, 1):
        at = (vers == v)[1:]
        np.testing.assert_allclose(behav[1:][at], per_version[v][at], atol=2e-5)
        assert not np.allclose(behav[1:][at], per_version[1 - v][at], atol=1e-3)


def test_group_stamped_at_a_new_version_never_runs_under_the_old_one():
    """The staleness race, forced: the trainer publishes v1 and bumps the buffer (as
    ``AsyncGeneration.publish`` does) while the server is in a round begun under v0, and
    the producer submits a group stamped v1 in that window. With η = 0 the group must be all
    v1; it used to start under v0, and taking it raised `StalenessError`."""
    from jaxrlhf.config import GenerationConfig
    from jaxrlhf.data.pipeline import PromptBatch
    from jaxrlhf.system.async_rollout import RolloutProducer
    from jaxrlhf.system.trajectory_queue import TrajectoryQueue

    cfg = TransformerConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=1,
                            num_heads=2, num_kv_heads=1, initializer_range=0.3)  # fmt: skip
    m0, m1 = init_model(cfg, seed=0), init_model(cfg, seed=1)

    class HookedRound(GenerationServer):
        hook = None

        def _admit(self):  # the round has taken its (absent) weight update already
            hook, self.hook = self.hook, None
            if hook is not None:
                hook()
            super()._admit()

    server = HookedRound(m0, max_slots=2, max_seq_len=16, decode_chunk=2, threaded=False)
    queue = TrajectoryQueue(batch_size=1, eta=0)
    ids = np.asarray([[3, 4, 5]], np.int32)
    batches = (PromptBatch(ids, np.ones_like(ids), ("p",), ("a",), np.zeros(1), np.full(1, k), k)
               for k in range(2))  # fmt: skip
    producer = RolloutProducer(
        server, queue, lambda: next(batches), _Chars(),
        GenerationConfig(n_samples=2, max_new_tokens=4, temperature=1.0), seed=0, batch_size=1,
    )  # fmt: skip
    producer._submit(*queue.reserve(timeout=0))
    server.run_until_idle()
    [(_, _, first)] = queue.take_batch(timeout=0)
    assert first == 0

    def publish_and_submit():
        server.update_weights(m1.params, 1)  # the trainer's publication of version 1
        queue.set_version(1)
        producer._submit(*queue.reserve(timeout=0))  # the producer's next group, stamped v1

    server.hook = publish_and_submit
    server.step()
    server.run_until_idle()
    [(_, traj, oldest)] = queue.take_batch(timeout=0)
    assert oldest == 1
    for vers, mask in zip(traj.versions, traj.response_mask, strict=True):
        assert set(vers[mask > 0].tolist()) == {1}


def test_generator_in_its_own_process(tmp_path):
    """``async_ppo.generator=process``: the disaggregated CPU path trains within η, exactly once,
    and fails loudly instead of hanging when the generation process dies."""
    eta, steps = 1, 3
    cfg = _config(tmp_path, "experiment.mode=async", f"experiment.max_head_offpolicyness={eta}",
                  "async_ppo.generator=process", "async_ppo.allocation=gen=1,train=4")  # fmt: skip
    coord = PPOCoordinator(cfg)
    used = []
    try:
        for _ in range(steps):
            metrics = coord.train_step()
            assert metrics["async/staleness_max"] <= eta
            used += coord.generation.consumed_uids
        assert len(used) == len(set(used)) == steps * cfg.data.batch_size
        deadline = time.monotonic() + 30  # the child applies weights at its next chunk boundary
        while coord.generation.server.health()["version"] != steps and time.monotonic() < deadline:
            time.sleep(0.05)
        assert coord.generation.server.health()["version"] == steps
        coord.generation.server._process.kill()
        # Either side may notice first: the producer (its submit fails) or the trainer (sending
        # the next weights fails); both are one clear error, never a hang.
        dead = "rollout producer failed|generation process 'async-gen' .* is gone"
        with pytest.raises(RuntimeError, match=dead):
            for _ in range(eta + 2):  # the buffer holds at most η batches already generated
                coord.train_step()
    finally:
        coord.close()


class _Chars:
    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(48 + int(t)) for t in tokens)


def test_allocation_errors(tmp_path):
    assert parse_allocation("gen=1, train=3", 4) == (1, 3)
    assert parse_allocation(None, 4) == (2, 2)
    for bad in ("gen=2,train=3", "gen=0,train=4", "train=2"):
        with pytest.raises(ConfigError, match=r"async_ppo\.allocation"):
            parse_allocation(bad, 4)
    with pytest.raises(ConfigError, match=r"async_ppo\.allocation"):
        PPOCoordinator(_config(tmp_path, "experiment.mode=async",
                                    "async_ppo.allocation=gen=3,train=3"))  # fmt: skip
    with pytest.raises(ConfigError, match="fused"):
        _config(tmp_path, "experiment.mode=async", "async_ppo.proximal=fused",
                "algorithm.ppo_epochs=2")  # fmt: skip


def test_resume_regenerates_in_flight_groups_and_keeps_the_capacity_rule(tmp_path):
    """Save mid-run (groups still generating or buffered), resume in a new coordinator: the
    groups not yet trained on are generated again from the same prompts, none is trained twice
    or skipped, staleness stays within η after the resume (the producer does not flood), and
    every trained group holds the prompt of its place in the data order."""
    eta, first, second = 1, 3, 4
    cfg = _config(tmp_path, "experiment.mode=async", f"experiment.max_head_offpolicyness={eta}",
                  "async_ppo.allocation=gen=2,train=2", "async_ppo.proximal=fused")  # fmt: skip
    B = cfg.data.batch_size
    prompts: dict[int, str] = {}  # group id -> prompt text of the trained group

    def train(coord, steps):
        for _ in range(steps):
            metrics = coord.train_step()
            assert metrics["async/staleness_max"] <= eta
            traj = coord.last_trajectories
            for j, gid in enumerate(coord.generation.consumed_gids):
                assert gid not in prompts, f"group {gid} trained twice"
                prompts[gid] = traj.prompts[j * traj.group_size]

    coord = PPOCoordinator(cfg)
    try:
        train(coord, first)
        time.sleep(0.5)  # let the producer run ahead: groups in flight and buffered at the save
        ahead = coord.generation.buffer.stats()["async/submitted"] - first * B
        coord.save()
        coord.checkpointer.wait()
    finally:
        coord.close()
    assert ahead > 0  # the save really dropped in-flight work from this process
    resumed = PPOCoordinator(cfg)
    try:
        assert (resumed.step, resumed.version) == (first, first)
        train(resumed, second)
    finally:
        resumed.close()
    trained = sorted(prompts)
    assert len(trained) == (first + second) * B
    watermark = next(g for g in range(len(trained) + 1) if g not in prompts)
    assert watermark > (first + second - eta - 1) * B  # holes only in the last rounds
    # The prompt order of the data: group g is row g % B of prompt batch g // B.
    it = resumed.train_pipe.iterator()
    order = [p for _ in range(max(trained) // B + 1) for p in next(it).prompts]
    assert all(prompts[g] == order[g] for g in trained)


class _InstantServer:
    """Completes every request at once with one token per sample (records the prompts)."""

    def __init__(self):
        self.prompts = []

    def submit(self, prompt, params, request_id):
        from concurrent.futures import Future

        from jaxrlhf.generation.types import Completion, RequestOutput

        self.prompts.append(tuple(int(t) for t in prompt))
        one = Completion(np.array([1], np.int32), np.zeros(1, np.float32),
                         np.zeros(1, np.float32), np.zeros(1, np.int32), "stop")  # fmt: skip
        future = Future()
        future.set_result(RequestOutput(request_id, tuple(prompt), (one,) * params.n))

        class Handle:
            def result(self):
                return future.result()

            def add_done_callback(self, fn):
                future.add_done_callback(lambda _: fn(self))

        return Handle()


def test_resumed_producer_skips_trained_groups_and_reads_whole_batches(tmp_path):
    """Starting at group 5 with groups 6 and 8-11 trained before: the producer submits groups
    5, 7, 12, 13, ... with their own prompts (batch 2, all trained, is read and passed over)."""
    from jaxrlhf.config import GenerationConfig
    from jaxrlhf.data.pipeline import PromptBatch
    from jaxrlhf.system.async_rollout import RolloutProducer
    from jaxrlhf.system.trajectory_queue import TrajectoryQueue

    B, first, skip = 4, 5, {6, 8, 9, 10, 11}

    def batch(k):
        ids = np.arange(B * 3, dtype=np.int32).reshape(B, 3) + 100 * k + 1
        return PromptBatch(ids, np.ones_like(ids), tuple(f"p{k}.{i}" for i in range(B)),
                           ("",) * B, np.arange(B), np.arange(B) + k * B, k)  # fmt: skip

    read = []

    def next_batch():
        k = first // B + len(read)
        read.append(k)
        return batch(k)

    server = _InstantServer()
    queue = TrajectoryQueue(B, eta=1, version=first // B)
    gen = GenerationConfig(n_samples=2, max_new_tokens=1)
    producer = RolloutProducer(server, queue, next_batch, tokenizer=type(
        "T", (), {"decode": staticmethod(lambda *a, **k: "")})(), gen=gen, seed=0, batch_size=B,
        first_gid=first, skip=skip)  # fmt: skip
    for _ in range(6):
        producer._submit(*queue.reserve(timeout=0))
    gids = [producer.gid_of[uid] for uid in sorted(producer.gid_of)]
    assert gids == [5, 7, 12, 13, 14, 15]
    assert read == [1, 2, 3]
    for gid, prompt in zip(gids, server.prompts, strict=True):
        k, i = divmod(gid, B)
        assert prompt == tuple(batch(k).input_ids_bt[i].tolist())
