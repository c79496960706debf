"""Train-state checkpoints on orbax: asynchronous, atomic, keep-last-N plus keep-best, reshardable.

A checkpoint is two items under ``<checkpoint.dir>/<step>/``:

- ``state``: any pytree of arrays (actor / critic params, optimizer states, RNG keys — typed
  keys included), written by every process for its own shards;
- ``host``: one JSON document (`HostState`): data-iterator state, metric history, the resolved
  config as YAML and free-form extras (a buffer cursor, a policy version), written by process 0.

Orbax writes a step into a temporary directory and renames it only once every item is on disk,
so a run killed mid-save leaves no step behind: `Checkpointer.latest_step` (and so resume) only
ever sees complete checkpoints, and the stale temporary directory is removed on the next start.
A save returns once the arrays are copied to host memory; the write continues in a background
thread, so the caller may donate or overwrite the device buffers right away.

    ckpt = Checkpointer(cfg.checkpoint)
    restored = ckpt.maybe_restore(abstract_like(state))          # None on a fresh run
    ...
    if ckpt.should_save(step, total_steps):
        ckpt.save(step, state, HostState(data_state=it.get_state(), metric_history=history))
    ckpt.close()                                                 # waits for the last write

All processes of a multi-process run make the same calls (orbax coordinates them).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Sharding
from orbax.checkpoint import checkpoint_managers as policies

from jaxrlhf.config import CheckpointConfig

__all__ = [
    "CheckpointNotFoundError",
    "Checkpointer",
    "HostState",
    "Restored",
    "abstract_like",
]

logger = logging.getLogger(__name__)

PyTree = Any
HOST_FORMAT = 1


class CheckpointNotFoundError(FileNotFoundError):
    """No complete checkpoint where one was asked for."""


@dataclasses.dataclass
class HostState:
    """The host-side (JSON) part of a checkpoint."""

    data_state: dict[str, Any] | None = None  # `PromptIterator.get_state()`
    metric_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    config: str | None = None  # the resolved config as YAML
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint read back: its step, the array pytree and the host state."""

    step: int
    state: PyTree
    host: HostState


def _jsonable(x: Any) -> Any:
    """Plain JSON types; numpy / JAX scalars become Python numbers (float32 → float is exact)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | np.generic | jax.Array):
        return np.asarray(x).tolist()
    return x


def abstract_like(tree: PyTree, shardings: PyTree | Sharding | None = None) -> PyTree:
    """Shape / dtype / sharding of every array in ``tree``: the target that `restore` fills.

    ``shardings`` (a matching tree, or one sharding for every leaf) puts the restored arrays on
    a different mesh or device; by default each array keeps its own sharding. ``tree`` may be
    abstract (``jax.eval_shape(init_fn)``: no need to build a state only to overwrite it).
    """
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
    if isinstance(shardings, Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class Checkpointer:
    """Saves and restores train state under ``cfg.dir`` (see the module docstring).

    ``keep_best_metric`` (e.g. ``"eval/reward"``): besides the last ``cfg.max_to_keep`` steps,
    keep the ``keep_best`` steps with the best value of that metric (``best_mode`` max or min),
    as passed to `save` in ``metrics``. Defaults come from the config when it has the fields.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        *,
        keep_best_metric: str | None = None,
        best_mode: Literal["max", "min"] | None = None,
        keep_best: int = 1,
        async_save: bool | None = None,
    ) -> None:
        if cfg.dir is None:
            raise ValueError("checkpoint.dir is not set.")
        self.cfg = cfg
        self.directory = Path(cfg.dir).absolute()
        metric = keep_best_metric or cfg.keep_best_metric
        mode = best_mode or cfg.best_mode
        use_async = async_save if async_save is not None else cfg.async_save
        keep: list[Any] = [policies.LatestN(n=cfg.max_to_keep)]
        best_fn = None
        if metric is not None:
            worst = -math.inf if mode == "max" else math.inf

            def best_fn(metrics: Mapping[str, float]) -> float:
                return float(metrics.get(metric, worst))  # saved under another metric: worst

            keep.append(
                policies.BestN(
                    get_metric_fn=best_fn,
                    reverse=mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,
            best_mode=mode,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            cleanup_tmp_directories=True,  # a save killed mid-write leaves a tmp dir behind
            enable_async_checkpointing=use_async,
            create=True,
        )
        self.keep_best_metric = metric
        self._mgr = ocp.CheckpointManager(
            self.directory, item_names=("state", "host"), options=options
        )

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None."""
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best ``keep_best_metric`` (the latest when none is set)."""
        return self._mgr.best_step()

    def should_save(self, step: int, total_steps: int | None = None) -> bool:
        """Every ``cfg.save_every`` steps and at the last step."""
        every = self.cfg.save_every
        return bool(every and step % every == 0) or step == total_steps

    # ------------------------------------------------------------------ save / restore

    def save(
        self,
        step: int,
        state: PyTree,
        host: HostState | None = None,
        *,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Start saving ``state`` and ``host`` as ``step``; False if that step already exists.

        Returns once the arrays are on the host; the write finishes in the background (the
        next `save`, `wait` or `close` waits for it). ``metrics`` ranks steps for keep-best.
        """
        if step in self._mgr.all_steps():
            return False
        host = host or HostState()
        doc = {"format": HOST_FORMAT, "step": step, **_jsonable(dataclasses.asdict(host))}
        best = None
        if metrics is not None and self.keep_best_metric in metrics:
            value = float(metrics[self.keep_best_metric])
            best = {self.keep_best_metric: value} if math.isfinite(value) else None
        saved = self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(doc)
            ),
            metrics=best,
            force=True,
        )
        if saved:
            logger.info("checkpoint: saving step %d to %s", step, self.directory)
        return bool(saved)

    def restore(self, target: PyTree | None = None, *, step: int | None = None) -> Restored:
        """Read ``step`` (default: the latest complete one) into ``target``'s structure.

        ``target``: abstract or concrete arrays (see `abstract_like`); restored arrays get its
        shardings, which may differ from the saved ones (another mesh, one device). With None,
        the saved structure comes back as nested dicts of arrays.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._mgr.all_steps():
            what = "no complete checkpoint" if step is None else f"no complete step {step}"
            raise CheckpointNotFoundError(f"{what} in {self.directory}.")
        if target is not None:
            target = jax.tree.map(
                lambda x: (
                    x
                    if isinstance(x, jax.ShapeDtypeStruct)
                    else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                ),
                target,
            )
        state_args = ocp.args.StandardRestore(target)
        out = self._mgr.restore(
            step, args=ocp.args.Composite(state=state_args, host=ocp.args.JsonRestore())
        )
        doc = dict(out["host"])
        if doc.pop("format", None) != HOST_FORMAT or doc.pop("step", None) != step:
            raise CheckpointNotFoundError(
                f"step {step} in {self.directory} has no valid host item."
            )
        return Restored(step=step, state=out["state"], host=HostState(**doc))

    def maybe_restore(self, target: PyTree | None = None) -> Restored | None:
        """The latest complete checkpoint if ``cfg.resume`` is on and one exists, else None."""
        if not self.cfg.resume or self.latest_step() is None:
            return None
        restored = self.restore(target)
        logger.info("checkpoint: resumed from step %d in %s", restored.step, self.directory)
        return restored

    # ------------------------------------------------------------------ export / lifetime

    def export_hf(self, handle: Any, path: str | None = None, *, tokenizer: Any = None) -> str:
        """Write the actor ``handle`` as an HF directory (default: ``<dir>/../hf_actor``).

        Every process calls it; process 0 writes (see `jaxrlhf.models.save_pretrained`).
        """
        from jaxrlhf.models import save_pretrained

        out = str(self.directory.parent / "hf_actor") if path is None else path
        save_pretrained(handle, out, tokenizer=tokenizer)
        return out

    def wait(self) -> None:
        """Block until the pending save is on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for the pending save and release the manager's threads."""
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
