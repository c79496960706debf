"""Asynchronous PPO (`main_async_ppo`): generation and training at once, on disjoint devices.

`AsyncGeneration` is the `GenerationStrategy` a `PPOCoordinator` runs with in
``experiment.mode: async``; the graph and the train step are the sync ones:

* the devices split into a generation sub-mesh and a train sub-mesh (``async_ppo.allocation``);
  models and train states live on the train mesh, a continuous-batching `GenerationServer` on the
  generation mesh, in a thread (``async_ppo.generator: thread``) or its own process (``process``);
* a `RolloutProducer` thread keeps the server fed, throttled by the capacity rule, and puts
  finished groups in a `TrajectoryQueue`;
* each train step's ``actor_gen`` takes the next batch the selection rule allows (every group
  at most η versions behind), the rest of the graph runs on it (rewards, ref / proximal
  log-probs, advantages, updates), then `publish` sends the new actor weights to the server,
  where they are re-laid onto the generation mesh (``jax.device_put``) and applied between
  decode chunks, and the buffer learns the new version.
"""

from __future__ import annotations

import re
import threading
import time
from typing import TYPE_CHECKING, Any

import jax

from jaxrlhf.config import Config, ConfigError
from jaxrlhf.generation.server import GenerationServer
from jaxrlhf.models import ModelHandle, make_mesh
from jaxrlhf.system.async_rollout import RolloutProducer, concat_trajectories
from jaxrlhf.system.rollout import Trajectories
from jaxrlhf.system.staleness import staleness_histogram
from jaxrlhf.system.trajectory_queue import TrajectoryQueue

if TYPE_CHECKING:
    from jaxrlhf.system.coordinator import PPOCoordinator
    from jaxrlhf.system.mfcs import StepContext

_ALLOCATION = re.compile(r"^\s*gen\s*=\s*(\d+)\s*,\s*train\s*=\s*(\d+)\s*$")


def parse_allocation(
    allocation: str | None, n_devices: int, *, remote_gen: bool = False
) -> tuple[int, int]:
    """``"gen=G,train=T"`` -> (G, T), which must add up to ``n_devices`` (None: half each).

    ``remote_gen``: the generator is another process with its own G devices, and this
    process's ``n_devices`` all train, so T must equal ``n_devices`` (None: G = T).
    """
    if allocation is None and remote_gen:
        return n_devices, n_devices
    if allocation is None:
        if n_devices < 2 or n_devices % 2:
            raise ConfigError(
                f"async_ppo.allocation is unset and {n_devices} devices cannot be split in "
                "half; set it, e.g. async_ppo.allocation='gen=1,train=1'."
            )
        return n_devices // 2, n_devices // 2
    match = _ALLOCATION.match(allocation)
    if match is None:
        raise ConfigError(
            f"async_ppo.allocation={allocation!r} is invalid; expected 'gen=G,train=T'."
        )
    gen, train = int(match[1]), int(match[2])
    if remote_gen and (gen < 1 or train != n_devices):
        raise ConfigError(
            f"async_ppo.allocation={allocation!r} does not match this process's {n_devices} "
            "devices: with async_ppo.generator='process' they all train (train must equal "
            "their count) and the generator process brings gen >= 1 devices of its own."
        )
    if remote_gen:
        return gen, train
    if gen < 1 or train < 1 or gen + train != n_devices:
        raise ConfigError(
            f"async_ppo.allocation={allocation!r} does not match the {n_devices} devices: "
            "gen and train must be >= 1 and add up to the device count."
        )
    return gen, train


def split_devices(
    allocation: str | None, devices: list[jax.Device] | None = None
) -> tuple[list[jax.Device], list[jax.Device]]:
    """(generation devices, train devices): the first G devices generate, the rest train."""
    devices = list(jax.devices() if devices is None else devices)
    gen, _ = parse_allocation(allocation, len(devices))
    return devices[:gen], devices[gen:]


class AsyncGeneration:
    """PPO / GRPO samples from a generation server running alongside training (η-bounded
    staleness); the `GenerationStrategy` of ``experiment.mode: async``.

    ``server``: a ready server (tests inject one); by default one is built on the generation
    devices (``async_ppo.generator: thread``) or in a child process (``process``).
    """

    def __init__(self, cfg: Config, *, server: Any | None = None) -> None:
        if cfg.experiment.mode != "async":
            raise ConfigError("AsyncGeneration needs experiment.mode='async'.")
        self.cfg = cfg
        self.remote_gen = cfg.async_ppo.generator == "process"
        if self.remote_gen:  # the generator process brings its own devices
            n_gen, _ = parse_allocation(cfg.async_ppo.allocation, jax.device_count(),
                                        remote_gen=True)  # fmt: skip
            self.gen_devices, self._train_devs = [], jax.devices()
        else:
            self.gen_devices, self._train_devs = split_devices(cfg.async_ppo.allocation)
            n_gen = len(self.gen_devices)
        self.n_gen_devices = n_gen
        self.eta = cfg.experiment.max_head_offpolicyness
        self.gen_mesh = None if self.remote_gen else make_mesh(-1, 1, 1, devices=self.gen_devices)
        self.server = server
        self.producer: RolloutProducer | None = None
        self._last: dict[str, float] | None = None
        self._taken: list[tuple[Any, Any, int]] = []
        self._waited = 0.0
        self._data_lock = threading.Lock()  # the producer reads data_iter, `save` its cursor
        self.consumed_uids: list[Any] = []
        self.consumed_min_versions: list[int] = []
        self.consumed_gids: list[int] = []

    def train_devices(self) -> list[jax.Device] | None:
        return self._train_devs

    def attach(self, coordinator: PPOCoordinator) -> None:
        self.coord = coord = coordinator
        cfg = self.cfg
        if self.server is None:
            self.server = self._make_server()
        self.buffer = TrajectoryQueue(cfg.data.batch_size, self.eta, version=coord.version)
        # Exactly-once over a resume: groups are numbered in data order (see async_rollout);
        # every group below `_watermark` has been trained on, and so have those in
        # `_consumed_above`. A checkpoint stores both and the data position of the watermark's
        # prompt batch, so a resumed run regenerates the groups that were in flight or
        # buffered at the save instead of dropping them.
        # A checkpoint without this entry (a sync run resumed in async mode) has trained on
        # the first `version` prompt batches.
        saved = coord.restored_extra.get("async", {})
        self._watermark = int(saved.get("watermark", coord.version * cfg.data.batch_size))
        self._consumed_above = {int(g) for g in saved.get("consumed", [])}
        self._batches_read = self._watermark // cfg.data.batch_size
        self._batch_states: dict[int, dict] = {}  # prompt batch index -> data state before it

    def _make_server(self) -> Any:
        cfg, coord = self.cfg, self.coord
        gen = cfg.generation
        max_seq_len = cfg.data.max_prompt_len + gen.max_new_tokens
        kwargs = dict(
            max_slots=gen.max_concurrent, max_seq_len=max_seq_len, decode_chunk=gen.decode_chunk,
            prefill_rows=gen.prefill_rows,
            version=coord.version, eos_token_id=coord.tokenizer.eos_token_id,
            seed=cfg.experiment.seed, name="async-gen",
        )  # fmt: skip
        models = coord.models
        if self.remote_gen:
            from jaxrlhf.system.remote_server import RemoteGenerationServer

            return RemoteGenerationServer(
                models.actor_cfg, models.actor.params, n_devices=self.n_gen_devices, **kwargs
            )
        handle = ModelHandle(models.actor_cfg, models.actor.params, self.gen_mesh)
        return GenerationServer(handle, **kwargs)

    # ----------------------------------------------------------------------- producer

    def _next_prompts(self):
        with self._data_lock:
            self._batch_states[self._batches_read] = self.coord.data_iter.get_state()
            self._batches_read += 1
            return next(self.coord.data_iter)

    def start(self) -> None:
        """Start generating (the first step does; tests may call it earlier)."""
        if self.producer is None:
            self.producer = RolloutProducer(
                self.server, self.buffer, self._next_prompts, self.coord.tokenizer,
                self.cfg.generation, seed=self.cfg.experiment.seed,
                batch_size=self.cfg.data.batch_size, first_gid=self._watermark,
                skip=self._consumed_above,
            ).start()  # fmt: skip

    def close(self) -> None:
        """Stop the producer and the server (in-flight groups are dropped)."""
        self.buffer.close()
        if self.producer is not None:
            self.producer.stop()
        self.server.close()

    # ----------------------------------------------------------------------- the step

    def step_inputs(self) -> dict[str, Any]:
        self.start()
        return {}

    def trajectories(self, ctx: StepContext, data: Any) -> Trajectories:
        """Take the next admissible batch (waiting while a group it needs still runs)."""
        start = time.perf_counter()
        try:
            self._taken = self.buffer.take_batch()
        except Exception:
            if self.producer is not None and self.producer.error is not None:
                raise RuntimeError("the rollout producer failed") from self.producer.error
            raise
        self._waited = time.perf_counter() - start
        return concat_trajectories([item for _, item, _ in self._taken])

    def publish(self, version: int) -> None:
        self.server.update_weights(self.coord.models.actor.params, version)
        self.buffer.set_version(version)
        self.consumed_uids = [uid for uid, _, _ in self._taken]
        self.consumed_min_versions = [v for _, _, v in self._taken]
        if self.producer is not None:
            self._mark_consumed([self.producer.gid_of.pop(uid) for uid in self.consumed_uids])

    def step_metrics(self, traj: Trajectories, start: float) -> dict[str, float]:
        now = time.perf_counter()
        counters = self.producer.counters() if self.producer is not None else {}
        last = self._last or {"t": start, "idle_s": 0.0, "tokens": 0, "samples": 0}
        wall = max(now - last["t"], 1e-9)
        version = self.coord.version
        metrics = staleness_histogram(version - 1, [v for _, _, v in self._taken], self.eta)
        metrics |= {
            "async/train_idle_frac": self._waited / (now - start),
            "async/gen_idle_frac": (counters.get("idle_s", 0.0) - last["idle_s"]) / wall,
            "perf/samples_per_s": len(traj) / (now - start),
            "perf/gen_tokens_per_s": (counters.get("tokens", 0) - last["tokens"]) / wall,
        }
        metrics |= self.buffer.stats()
        self._last = {"t": now, **counters} if counters else None
        return metrics

    def _mark_consumed(self, gids: list[int]) -> None:
        self.consumed_gids = gids
        with self._data_lock:
            self._consumed_above.update(gids)
            while self._watermark in self._consumed_above:
                self._consumed_above.discard(self._watermark)
                self._watermark += 1
            batch = self._watermark // self.cfg.data.batch_size
            for k in [k for k in self._batch_states if k < batch]:
                del self._batch_states[k]  # a checkpoint never needs them again

    # ----------------------------------------------------------------------- checkpoints

    def data_state(self) -> Any:
        """The data position of the first prompt batch with a group not yet trained on (the
        producer reads ahead)."""
        batch = self._watermark // self.cfg.data.batch_size
        state = self._batch_states.get(batch)
        if state is None:  # the producer has not read that batch yet: the current position
            assert batch == self._batches_read, (batch, self._batches_read)
            state = self.coord.data_iter.get_state()
        return state

    def host_extra(self) -> dict[str, Any]:
        """Which groups past the watermark were trained on."""
        return {"async": {"watermark": self._watermark, "consumed": sorted(self._consumed_above)}}

    def save_lock(self) -> threading.Lock:
        return self._data_lock
