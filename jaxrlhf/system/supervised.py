"""The trainer shared by supervised trainers (SFT, reward models): build the model from the
``actor`` config group and step through a deterministic batch stream; the loop, evaluation
cadence, checkpoints, exact resume and export are `jaxrlhf.system.run_loop.RunLoop`'s.

Subclasses say what a batch, a step, an evaluation and an export are (`SFTTrainer`,
`RMTrainer`); the device work is in `jaxrlhf.interfaces.sft` / `jaxrlhf.interfaces.rm`.
The batch of step k is a pure function of (data, seed, k) (`data.sft.index_batch`), so the
resume cursor is the step count; a checkpoint made on other data or batching is refused.
"""

from __future__ import annotations

import abc
import time
from typing import Any

import jax

from jaxrlhf.checkpoint import Restored
from jaxrlhf.config import Config, ConfigError
from jaxrlhf.data.sft import ExampleTable, index_batch
from jaxrlhf.interfaces import TrainState, init_train_state
from jaxrlhf.interfaces.packing import bucket_size
from jaxrlhf.logging import MetricsLogger
from jaxrlhf.models import ModelHandle, build_model
from jaxrlhf.system.run_loop import RunLoop
from jaxrlhf.system.specs import optimizer_spec


class SupervisedTrainer(RunLoop):
    """Batches, steps and the model of a supervised run; subclasses fill in the abstract steps."""

    name = "supervised"
    value_head = False  # a reward model: trunk + scalar head, no LM head

    def __init__(self, cfg: Config, *, logger: MetricsLogger | None = None) -> None:
        super().__init__(cfg)
        self.train_table, self.eval_table = self.load_tables()
        heads = {"lm_head": not self.value_head, "value_head": self.value_head}
        self.handle = build_model(cfg.actor, mesh=self.mesh, seed=cfg.experiment.seed, **heads)
        self._check_model()
        self.state: TrainState = init_train_state(
            self.handle.params, self.handle.config, optimizer_spec(cfg.actor.optimizer),
            total_steps=self.total, mesh=self.mesh,
        )  # fmt: skip
        self.restore()
        self.start_logging(logger)

    # ----------------------------------------------------------------------- subclass hooks

    @abc.abstractmethod
    def load_tables(self) -> tuple[ExampleTable, ExampleTable | None]:
        """(train, eval or None) examples."""

    @abc.abstractmethod
    def train_on(self, examples: list[Any]) -> dict[str, Any]:
        """One optimizer step on ``examples``; updates ``self.state``; returns metrics, with
        ``seq_tokens`` (tokens the model ran on, for the throughput)."""

    @abc.abstractmethod
    def eval_metrics(self) -> dict[str, float]:
        """``eval/*`` metrics on the eval examples (up to ``data.eval_size``)."""

    @abc.abstractmethod
    def export(self) -> str:
        """Write the trained model as an HF directory; returns its path."""

    # ----------------------------------------------------------------------- building

    @property
    @abc.abstractmethod
    def max_seq_len(self) -> int:
        """The longest prompt + response a row may have (``sft`` / ``rm.max_seq_len``)."""

    @property
    def row_len(self) -> int:
        """Tokens per packed row: the bucketed longest sequence allowed (steady shapes)."""
        return bucket_size(self.max_seq_len)

    @property
    def batch_shards(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @property
    def max_tokens_per_mb(self) -> int:
        return max(self.cfg.actor.max_tokens_per_mb, self.row_len)

    def _check_model(self) -> None:
        c = self.handle.config
        if len(self.tokenizer) > c.vocab_size:
            raise ConfigError(
                f"actor.vocab_size={c.vocab_size} is smaller than the tokenizer's "
                f"{len(self.tokenizer)} tokens."
            )
        if self.max_seq_len > c.max_position_embeddings:
            raise ConfigError(
                f"{self.name}.max_seq_len ({self.max_seq_len}) must be <= the model's "
                f"max_position_embeddings ({c.max_position_embeddings})."
            )

    def eval_examples(self) -> list[Any]:
        table = self.eval_table
        if table is None:
            return []
        limit = self.cfg.data.eval_size
        return list(table.examples[: limit if limit is not None else len(table)])

    def batch(self, step: int) -> list[Any]:
        """The examples of global batch ``step`` (0-based)."""
        d = self.cfg.data
        index = index_batch(len(self.train_table), d.batch_size, step,
                            seed=self.cfg.experiment.seed, shuffle=d.shuffle)  # fmt: skip
        return [self.train_table.examples[i] for i in index]

    # ----------------------------------------------------------------------- run-loop hooks

    def state_tree(self) -> dict[str, Any]:
        return {"model": self.state}

    def set_state_tree(self, tree: dict[str, Any]) -> None:
        self.state = tree["model"]

    def data_state(self) -> dict[str, Any]:
        d = self.cfg.data
        return {"fingerprint": self.train_table.fingerprint, "batch_size": d.batch_size,
                "seed": self.cfg.experiment.seed, "shuffle": d.shuffle}  # fmt: skip

    def restore(self) -> Restored | None:
        restored = super().restore()
        if restored is not None and restored.host.data_state != self.data_state():
            raise ConfigError(
                f"the checkpoint in {self.checkpointer.directory} was made with other data or "
                "batching (data, data.batch_size, experiment.seed, data.shuffle); resume with the "
                "same settings or set checkpoint.resume=false."
            )
        return restored

    def model_handle(self) -> ModelHandle:
        """The trained model (the train state's params) as a handle for export."""
        h = self.handle
        return ModelHandle(h.config, self.state.params, self.mesh, h.hf_config, h.source_path)

    def evaluate(self) -> dict[str, float] | None:
        return None if self.eval_table is None else self.eval_metrics()

    def train_step(self) -> dict[str, Any]:
        examples = self.batch(self.step)
        self.step += 1
        tick = time.perf_counter()
        metrics = self.train_on(examples)
        metrics = jax.device_get(metrics)  # also waits for the step: timing below is real
        tokens = float(metrics.pop("seq_tokens"))
        metrics = {f"train/{k}": v for k, v in metrics.items()}
        metrics["perf/tokens_per_s"] = tokens / max(time.perf_counter() - tick, 1e-9)
        return metrics
