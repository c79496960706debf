"""The host loop shared by supervised trainers (SFT, reward models): build the model from the
``actor`` config group, step through a deterministic batch stream, evaluate every
``experiment.eval_every`` steps, checkpoint, resume exactly, export an HF directory at the end.

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
import numpy as np

from jaxrlhf.checkpoint import Checkpointer, HostState, abstract_like
from jaxrlhf.config import Config, ConfigError, config_to_yaml, save_config
from jaxrlhf.data.pipeline import load_tokenizer
from jaxrlhf.data.sft import ExampleTable, index_batch
from jaxrlhf.interfaces import TrainState, init_train_state
from jaxrlhf.interfaces.packing import bucket_size
from jaxrlhf.logging import MetricsLogger, history_entry
from jaxrlhf.models import MeshError, ModelHandle, build_model, make_mesh
from jaxrlhf.system.specs import optimizer_spec


class SupervisedTrainer(abc.ABC):
    """Loop, evaluation, checkpoints, resume and export; subclasses fill in the abstract steps."""

    name = "supervised"
    value_head = False  # a reward model: trunk + scalar head, no LM head

    def __init__(self, cfg: Config, *, logger: MetricsLogger | None = None) -> None:
        self.cfg = cfg
        try:
            self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        except MeshError as e:
            raise ConfigError(str(e)) from None
        self.tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.actor.path)
        self.train_table, self.eval_table = self.load_tables()
        heads = {"lm_head": not self.value_head, "value_head": self.value_head}
        self.handle = build_model(cfg.actor, mesh=self.mesh, seed=cfg.experiment.seed, **heads)
        self._check_model()
        self.total = cfg.experiment.total_steps
        self.checkpointer = Checkpointer(cfg.checkpoint)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.state: TrainState = init_train_state(
            self.handle.params, self.handle.config, optimizer_spec(cfg.actor.optimizer),
            total_steps=self.total, mesh=self.mesh,
        )  # fmt: skip
        self._maybe_resume()
        self.logger = logger or MetricsLogger.from_config(cfg, start_step=self.step)

    # ----------------------------------------------------------------------- subclass hooks

    @abc.abstractmethod
    def load_tables(self) -> tuple[ExampleTable, ExampleTable | None]:
        """(train, eval or None) examples."""

    @abc.abstractmethod
    def train_on(self, examples: list[Any]) -> dict[str, Any]:
        """One optimizer step on ``examples``; updates ``self.state``; returns metrics, with
        ``seq_tokens`` (tokens the model ran on, for the throughput)."""

    @abc.abstractmethod
    def evaluate(self) -> dict[str, float]:
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

    # ----------------------------------------------------------------------- checkpoints

    def _data_state(self) -> dict[str, Any]:
        d = self.cfg.data
        return {"fingerprint": self.train_table.fingerprint, "batch_size": d.batch_size,
                "seed": self.cfg.experiment.seed, "shuffle": d.shuffle}  # fmt: skip

    def _maybe_resume(self) -> None:
        if not self.cfg.checkpoint.resume or self.checkpointer.latest_step() is None:
            return
        restored = self.checkpointer.restore(abstract_like({"model": self.state}))
        if restored.host.data_state != self._data_state():
            raise ConfigError(
                f"the checkpoint in {self.checkpointer.directory} was made with other data or "
                "batching (data, data.batch_size, experiment.seed, data.shuffle); resume with the "
                "same settings or set checkpoint.resume=false."
            )
        self.state = restored.state["model"]
        self.step = restored.host.extra["step"]
        self.history = restored.host.metric_history
        self.eval_history = restored.host.extra.get("eval_history", [])
        print(f"resumed from step {restored.step} in {self.checkpointer.directory}")

    def save(self, metrics: dict[str, Any] | None = None) -> None:
        host = HostState(
            data_state=self._data_state(),
            metric_history=self.history,
            config=config_to_yaml(self.cfg),
            extra={"step": self.step, "eval_history": self.eval_history},
        )
        self.checkpointer.save(self.step, {"model": self.state}, host, metrics=metrics)

    def model_handle(self) -> ModelHandle:
        """The trained model (the train state's params) as a handle for export."""
        h = self.handle
        return ModelHandle(h.config, self.state.params, self.mesh, h.hf_config, h.source_path)

    # ----------------------------------------------------------------------- loop

    def run(self) -> dict[str, Any]:
        """Train to ``experiment.total_steps``; returns before / after eval metrics, steps,
        seconds and the export path."""
        cfg = self.cfg
        save_config(cfg, f"{cfg.experiment.output_dir}/config.yaml")
        start = time.perf_counter()
        if not self.eval_history and self.eval_table is not None:
            before = self.evaluate() | {"step": self.step}
            self.eval_history.append(before)
            self.logger.log(self.step, before)
        while self.step < self.total:
            examples = self.batch(self.step)
            self.step += 1
            tick = time.perf_counter()
            metrics = self.train_on(examples)
            metrics = jax.device_get(metrics)  # also waits for the step: timing below is real
            tokens = float(metrics.pop("seq_tokens"))
            metrics = {f"train/{k}": v for k, v in metrics.items()}
            metrics["perf/tokens_per_s"] = tokens / max(time.perf_counter() - tick, 1e-9)
            every = cfg.experiment.eval_every
            due = (every and self.step % every == 0) or self.step == self.total
            if due and self.eval_table is not None:
                ev = self.evaluate()
                self.eval_history.append(ev | {"step": self.step})
                metrics |= ev
            logged = self.logger.log(self.step, metrics)
            self.history.append(history_entry(logged))
            if self.checkpointer.should_save(self.step, self.total):
                ranked = {k: v for k, v in metrics.items() if k.startswith("eval/")}
                self.save({k: float(np.asarray(v)) for k, v in ranked.items()} or None)
        self.checkpointer.close()
        path = self.export()
        self.logger.print(f"exported {path}")
        return {
            "before": self.eval_history[0] if self.eval_history else {},
            "after": self.eval_history[-1] if self.eval_history else {},
            "steps": self.step,
            "seconds": time.perf_counter() - start,
            "export": path,
        }
