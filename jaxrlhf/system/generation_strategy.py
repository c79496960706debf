"""Where a PPO step's trajectories come from: the strategy a `PPOCoordinator` is given.

The dataflow graph is the same in both modes; its ``actor_gen`` MFC asks the strategy for the
step's samples:

* `SyncGeneration` (``experiment.mode: sync``): generate ``n`` samples for each prompt of this
  step's batch on the coordinator's sampler, which holds the current weights;
* `AsyncGeneration` (``experiment.mode: async``, `jaxrlhf.system.async_ppo`): take the next
  admissible batch of groups from a generation server that runs alongside training.

A strategy also says which devices train, publishes the weights of each new policy version, and
adds what it needs to a checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Protocol

import jax

from jaxrlhf.config import Config
from jaxrlhf.system import distributed
from jaxrlhf.system.rollout import Trajectories, generate_trajectories

if TYPE_CHECKING:
    from jaxrlhf.system.coordinator import PPOCoordinator
    from jaxrlhf.system.mfcs import StepContext


class GenerationStrategy(Protocol):
    """What `PPOCoordinator` asks of a source of trajectories."""

    def train_devices(self) -> list[jax.Device] | None:
        """The devices of the train mesh (None: all)."""

    def attach(self, coordinator: PPOCoordinator) -> None:
        """Called once the coordinator's models, data and version are in place."""

    def step_inputs(self) -> dict[str, Any]:
        """The dataset keys of the next step's graph data."""

    def trajectories(self, ctx: StepContext, data: Any) -> Trajectories:
        """This step's samples (the ``actor_gen`` MFC)."""

    def publish(self, version: int) -> None:
        """The actor's weights after an update are policy ``version``: send them on."""

    def step_metrics(self, traj: Trajectories, start: float) -> dict[str, float]:
        """Metrics of the step that began at ``start`` (perf_counter seconds)."""

    def data_state(self) -> Any:
        """The data position a checkpoint stores."""

    def host_extra(self) -> dict[str, Any]:
        """What else a checkpoint stores for this strategy."""

    def save_lock(self) -> contextlib.AbstractContextManager[Any]:
        """Held while a checkpoint is written."""

    def close(self) -> None:
        """Stop whatever runs in the background."""


class SyncGeneration:
    """Generate each step's samples from its prompt batch, on the current weights."""

    def train_devices(self) -> list[jax.Device] | None:
        return None

    def attach(self, coordinator: PPOCoordinator) -> None:
        self.coord = coordinator

    def step_inputs(self) -> dict[str, Any]:
        batch = next(self.coord.data_iter)
        distributed.check_same(batch.sample_ids_b, "the step's prompt batch")
        return {"prompt_batch": batch, "prompt_ids": batch.input_ids_bt, "answers": batch.answers}

    def trajectories(self, ctx: StepContext, data: Any) -> Trajectories:
        cfg = ctx.cfg
        return generate_trajectories(
            self.coord.current_sampler(), data["prompt_batch"], ctx.tokenizer, cfg.generation,
            seed=cfg.experiment.seed * 1_000_003 + ctx.step, version=ctx.version,
        )  # fmt: skip

    def publish(self, version: int) -> None:
        self.coord.current_sampler()  # the next step generates with these weights

    def step_metrics(self, traj: Trajectories, start: float) -> dict[str, float]:
        return {}

    def data_state(self) -> Any:
        return self.coord.data_iter.get_state()

    def host_extra(self) -> dict[str, Any]:
        return {}

    def save_lock(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def close(self) -> None:
        return None


def generation_strategy(cfg: Config) -> GenerationStrategy:
    """The strategy ``experiment.mode`` names."""
    if cfg.experiment.mode == "async":
        from jaxrlhf.system.async_ppo import AsyncGeneration

        return AsyncGeneration(cfg)
    return SyncGeneration()
