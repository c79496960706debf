"""The run loop shared by every trainer (PPO / GRPO, SFT, reward models).

A `RunLoop` owns what every run has: the mesh, the tokenizer, the checkpointer, the logger, the
step counter and the metric / eval history. `run` trains to ``experiment.total_steps``:
evaluate before the first step and every ``experiment.eval_every`` steps (and at the last one),
log each step, checkpoint as ``checkpoint.*`` says, and export at the end. A subclass says what
its state, a step, an evaluation and an export are; resume restores the state tree it names and
the host side (step, history, data position) that this class writes.

Stopping early, never losing the run (`jaxrlhf.system.run_guards`):
- a ``STOP`` file in the output directory: save, stop, export, return as a finished run does;
- SIGINT / SIGTERM / SIGUSR1: finish the current step, save (whatever ``checkpoint.save_every``
  says), flush the metrics and raise `RunStopped` (exit status 128 + the signal's number);
- ``algorithm.max_bad_steps`` steps in a row with a non-finite metric or a skipped non-finite
  update (``train/bad_steps`` counts them): raise `DivergedError` without saving;
- a save whose state is not finite is refused (`DivergedError`): the latest checkpoint stays
  the last good one.

In a multi-process run every process runs the same loop; process 0 logs and decides when to
save or stop (a signal on any process stops them all), the others follow (`distributed.decide`).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import signal
import time
from pathlib import Path
from typing import Any

import jax

from jaxrlhf.checkpoint import Checkpointer, HostState, Restored, abstract_like
from jaxrlhf.config import Config, config_to_yaml, save_config
from jaxrlhf.data.pipeline import load_tokenizer
from jaxrlhf.errors import DivergedError, RunStopped
from jaxrlhf.logging import MetricsLogger, history_entry, make_dir, to_host_scalars
from jaxrlhf.models import make_mesh
from jaxrlhf.system import distributed
from jaxrlhf.system.run_guards import BadSteps, StopSignals, nonfinite_leaves

STOP_FILE = 1  # `_stop_reason` when the STOP file asks (signals give their number, > 1)


class RunLoop(abc.ABC):
    """Mesh, checkpoints, resume, logging, evaluation cadence and export for one run."""

    def __init__(self, cfg: Config, *, devices: list[jax.Device] | None = None) -> None:
        self.cfg = cfg
        # First, so a path that cannot serve is one sentence naming its key, before any writer.
        make_dir(cfg.experiment.output_dir, "experiment.output_dir")
        make_dir(cfg.checkpoint.dir, "checkpoint.dir")
        # a mesh that does not fit the devices is a MeshError, itself a ConfigError
        self.mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
        self.tokenizer = load_tokenizer(
            cfg.data.tokenizer or cfg.actor.path,
            key="data.tokenizer" if cfg.data.tokenizer else "actor.path",
        )
        self.total = cfg.experiment.total_steps
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.logger: MetricsLogger | None = None
        self.bad_steps = BadSteps(cfg.algorithm.max_bad_steps)

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
        """Restore the newest intact checkpoint into the current state tree (whose shapes
        and shardings it is read into); None for a fresh run. A damaged step is skipped (one
        line each); a config that does not fit the checkpoint is a `ConfigError`."""
        if not self.resuming:
            return None
        target = abstract_like(self.state_tree())
        restored = self.checkpointer.restore(target, config=self.cfg, report=self.say)
        self.set_state_tree(dict(restored.state))
        extra = restored.host.extra
        self.step = int(extra.get("step", restored.step))
        self.history = list(restored.host.metric_history)
        self.eval_history = list(extra.get("eval_history", []))
        self.bad_steps.load(extra.get("bad_steps"))  # a bad-step streak goes on across a resume
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
            extra={"step": self.step, "eval_history": self.eval_history,
                   "bad_steps": self.bad_steps.state()} | self.host_extra(),
        )  # fmt: skip

    def save(self, metrics: dict[str, Any] | None = None) -> None:
        """Checkpoint this step (``metrics`` rank it for keep-best); a state holding NaN or inf
        is refused (`DivergedError`), so the latest checkpoint stays the last good one."""
        tree = self.state_tree()
        bad = nonfinite_leaves(tree)
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise DivergedError(
                f"training diverged: at step {self.step} the state is not finite ({bad[0]}{more} "
                f"hold NaN or inf); no checkpoint written, {self._latest_text()}."
            )
        self.checkpointer.save(self.step, tree, self.host_state(), metrics=metrics)

    def _latest_text(self) -> str:
        latest = self.checkpointer.latest_step()
        where = self.checkpointer.directory
        return f"the latest stays step {latest} in {where}" if latest else f"none in {where}"

    def _stop_reason(self, signals: StopSignals) -> int:
        """0 to go on; `STOP_FILE` when process 0 finds a ``STOP`` file in the output directory;
        a signal's number when any process received one (`StopSignals`)."""
        local = int(signals.received or 0)
        if not local and distributed.is_main():
            local = STOP_FILE if (Path(self.cfg.experiment.output_dir) / "STOP").exists() else 0
        return distributed.max_over_processes(local)

    def _stop(self, reason: int) -> None:
        """Save this step and stop: return for the ``STOP`` file, raise `RunStopped` (exit
        status 128 + its number) for a signal."""
        if reason == STOP_FILE:
            stop = Path(self.cfg.experiment.output_dir) / "STOP"
            self.say(f"{stop} found: saving and stopping at step {self.step}")
            self.save()
            return
        self.save()
        self.checkpointer.close()  # the save is on disk before the process ends
        name = signal.Signals(reason).name
        resume = (
            "rerun the same command to resume"
            if self.cfg.checkpoint.resume
            else "rerun with checkpoint.resume=true to resume"
        )
        raise RunStopped(
            f"jaxrlhf: stopped by {name} after step {self.step} of {self.total}; checkpoint "
            f"saved in {self.checkpointer.directory}; {resume}.",
            128 + reason,
        )

    def _check_step(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Count the step if bad (process 0, which fetches the metrics; `BadSteps`) and add the
        streak as ``train/bad_steps``; after ``algorithm.max_bad_steps`` the run is stopped by
        `_diverge` once the step is logged. Returns the metrics (host values on process 0)."""
        if not distributed.is_main():
            return metrics
        host = to_host_scalars(metrics)
        host["train/bad_steps"] = self.bad_steps.update(self.step, host)
        return host

    def _diverge(self) -> None:
        # Process 0 counted (it fetches the metrics); the others only follow its decision.
        first = self.bad_steps.describe() if distributed.is_main() else "process 0's first"
        raise DivergedError(
            f"training diverged: {self.bad_steps.limit} steps in a row with non-finite values "
            f"(algorithm.max_bad_steps={self.bad_steps.limit}), the first at {first}; stopped "
            f"at step {self.step} without saving, {self._latest_text()}."
        )

    # ----------------------------------------------------------------------- loop

    def _evaluate_into_history(self) -> dict[str, float]:
        ev = self.evaluate()
        if ev is None:
            return {}
        self.eval_history.append(ev | {"step": self.step})
        return ev

    def _one_step(self) -> None:
        """Train, evaluate when due, log, stop on divergence, save when due."""
        metrics = self.train_step()
        every = self.cfg.experiment.eval_every
        if (every and self.step % every == 0) or self.step == self.total:
            metrics |= self._evaluate_into_history()
        metrics = self._check_step(metrics)
        logged = self.logger.log(self.step, metrics)
        self.history.append(history_entry(logged))
        if distributed.decide(self.bad_steps.exhausted):
            self._diverge()
        if distributed.decide(self.checkpointer.should_save(self.step, self.total)):
            ranked = {k: float(v) for k, v in metrics.items() if k.startswith("eval/")}
            self.save(ranked or None)

    def _close_checkpointer(self, *, failing: bool = False) -> None:
        """Wait for the pending save and stop orbax's threads (when a checkpointer was made);
        ``failing``: another error is on its way out, which a failure here must not hide."""
        if "checkpointer" not in self.__dict__:
            return
        with contextlib.suppress(Exception) if failing else contextlib.nullcontext():
            self.checkpointer.close()

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
        try:
            with StopSignals(announce=distributed.is_main()) as signals:
                while self.step < self.total:
                    reason = self._stop_reason(signals)
                    if reason:
                        self._stop(reason)
                        break
                    self._one_step()
        except BaseException:  # a stop, divergence or bug: the last good save still lands
            self._close_checkpointer(failing=True)
            raise
        self._close_checkpointer()
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
