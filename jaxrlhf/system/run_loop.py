"""The run loop shared by every trainer (PPO / GRPO, SFT, reward models).

A `RunLoop` owns what every run has: the mesh, the tokenizer, the checkpointer, the logger, the
step counter and the metric / eval history. `run` trains to ``experiment.total_steps``:
evaluate before the first step and every ``experiment.eval_every`` steps (and at the last one),
log each step, checkpoint as ``checkpoint.*`` says, stop early (after a save) when a ``STOP``
file appears in the output directory, and export at the end. A subclass says what its state, a
step, an evaluation and an export are; resume restores the state tree it names and the host
side (step, history, data position) that this class writes.

In a multi-process run every process runs the same loop; process 0 logs and decides when to
save or stop, the others follow (`distributed.decide`).
"""

from __future__ import annotations

import abc
import functools
import time
from pathlib import Path
from typing import Any

import jax

from jaxrlhf.checkpoint import Checkpointer, HostState, Restored, abstract_like
from jaxrlhf.config import Config, ConfigError, config_to_yaml, save_config
from jaxrlhf.data.pipeline import load_tokenizer
from jaxrlhf.logging import MetricsLogger, history_entry
from jaxrlhf.models import MeshError, make_mesh
from jaxrlhf.system import distributed


class RunLoop(abc.ABC):
    """Mesh, checkpoints, resume, logging, evaluation cadence and export for one run."""

    def __init__(self, cfg: Config, *, devices: list[jax.Device] | None = None) -> None:
        self.cfg = cfg
        try:
            self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
        except MeshError as e:
            raise ConfigError(str(e)) from None
        self.tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.actor.path)
        self.total = cfg.experiment.total_steps
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.logger: MetricsLogger | None = None

    @functools.cached_property
    def checkpointer(self) -> Checkpointer:
        """Made on first use, once the subclass has built what may fail on bad input (orbax
        starts a background thread that a failed start-up would leave behind)."""
        return Checkpointer(self.cfg.checkpoint)

    # ----------------------------------------------------------------------- subclass hooks

    @abc.abstractmethod
    def state_tree(self) -> dict[str, Any]:
        """The device state a checkpoint holds (train states, frozen params)."""

    @abc.abstractmethod
    def set_state_tree(self, tree: dict[str, Any]) -> None:
        """Adopt a restored `state_tree`."""

    @abc.abstractmethod
    def data_state(self) -> Any:
        """The data position a checkpoint stores (JSON-able)."""

    @abc.abstractmethod
    def train_step(self) -> dict[str, Any]:
        """One step: advances ``self.step`` and returns its metrics (host values)."""

    @abc.abstractmethod
    def evaluate(self) -> dict[str, float] | None:
        """``eval/*`` metrics, or None when the run has nothing to evaluate on."""

    @abc.abstractmethod
    def export(self) -> str | None:
        """Write the trained model as an HF directory (its path), or None when not asked to."""

    def host_extra(self) -> dict[str, Any]:
        """Host state besides step and eval history that a checkpoint keeps."""
        return {}

    # ----------------------------------------------------------------------- resume

    @property
    def resuming(self) -> bool:
        """Whether `restore` will find a checkpoint to continue from."""
        return self.cfg.checkpoint.resume and self.checkpointer.latest_step() is not None

    def restore(self) -> Restored | None:
        """Restore the latest complete checkpoint into the current state tree (whose shapes
        and shardings it is read into); None for a fresh run."""
        if not self.resuming:
            return None
        restored = self.checkpointer.restore(abstract_like(self.state_tree()))
        self.set_state_tree(dict(restored.state))
        extra = restored.host.extra
        self.step = int(extra["step"])
        self.history = list(restored.host.metric_history)
        self.eval_history = list(extra.get("eval_history", []))
        self.say(f"resumed from step {restored.step} in {self.checkpointer.directory}")
        return restored

    def start_logging(self, logger: MetricsLogger | None = None) -> MetricsLogger:
        """The run's logger, made once the start step is known (a resumed run appends)."""
        self.logger = logger or MetricsLogger.from_config(
            self.cfg, start_step=self.step, is_main=distributed.is_main()
        )
        return self.logger

    def say(self, text: str) -> None:
        """A line for the user (process 0 only)."""
        if self.logger is not None:
            self.logger.print(text)
        elif distributed.is_main():
            print(text, flush=True)

    # ----------------------------------------------------------------------- checkpoints

    def host_state(self) -> HostState:
        """The host side of a checkpoint: data position, history, config, counters."""
        return HostState(
            data_state=self.data_state(),
            metric_history=self.history,
            config=config_to_yaml(self.cfg),
            extra={"step": self.step, "eval_history": self.eval_history} | self.host_extra(),
        )

    def save(self, metrics: dict[str, Any] | None = None) -> None:
        """Checkpoint this step (``metrics`` rank it for keep-best)."""
        self.checkpointer.save(self.step, self.state_tree(), self.host_state(), metrics=metrics)

    def _stop_requested(self) -> bool:
        """A ``STOP`` file in the output directory ends the run after a save; process 0 looks,
        the others follow its decision."""
        stop = Path(self.cfg.experiment.output_dir) / "STOP"
        if not distributed.decide(stop.exists()):
            return False
        self.say(f"{stop} found: saving and stopping at step {self.step}")
        self.save()
        return True

    # ----------------------------------------------------------------------- loop

    def _evaluate_into_history(self) -> dict[str, float]:
        ev = self.evaluate()
        if ev is None:
            return {}
        self.eval_history.append(ev | {"step": self.step})
        return ev

    def run(self) -> dict[str, Any]:
        """Train to ``experiment.total_steps``; returns the eval metrics before and after, the
        steps run, wall seconds and the export path (None without an export)."""
        cfg = self.cfg
        if self.logger is None:
            self.start_logging()
        if distributed.is_main():
            save_config(cfg, f"{cfg.experiment.output_dir}/config.yaml")
        start = time.perf_counter()
        if not self.eval_history:
            before = self._evaluate_into_history()
            if before:
                self.logger.log(self.step, before)
        while self.step < self.total and not self._stop_requested():
            metrics = self.train_step()
            every = cfg.experiment.eval_every
            if (every and self.step % every == 0) or self.step == self.total:
                metrics |= self._evaluate_into_history()
            logged = self.logger.log(self.step, metrics)
            self.history.append(history_entry(logged))
            if distributed.decide(self.checkpointer.should_save(self.step, self.total)):
                ranked = {k: float(v) for k, v in metrics.items() if k.startswith("eval/")}
                self.save(ranked or None)
        self.checkpointer.close()
        path = self.export()
        if path is not None:
            self.say(f"exported {path}")
        return {
            "before": self.eval_history[0] if self.eval_history else {},
            "after": self.eval_history[-1] if self.eval_history else {},
            "steps": self.step,
            "seconds": time.perf_counter() - start,
            "export": path,
        }
