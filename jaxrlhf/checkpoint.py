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

What goes wrong, and what `restore` and `save` do about it:

- **A damaged step** (a truncated or overwritten array file, a missing ``state/_METADATA``, an
  unreadable host JSON): `restore` tries it — reading it back is the check — and falls back to
  the newest step that reads; each step skipped is one line (``report``), and is moved to
  ``<dir>/damaged/<step>`` for inspection (never deleted) so that the run can save that step
  again. No intact step at all is `CheckpointIOError`, naming the newest step's problem.
- **A config that does not fit** (`state_settings` differ: the model architecture, the actor,
  critic or reference paths, whether a critic or a reference is kept; or arrays whose shapes
  or names differ from ``target``'s): `ConfigError` listing the keys, before any array is read.
  Other differences (learning rate, steps, logging, mesh: orbax reshards) are one line of note.
- **A write that fails** (a full disk during an asynchronous save): `CheckpointIOError` at the
  next `save`, `wait` or `close`; the step was never committed, so the previous one remains
  the latest, and its partial temporary directory is removed on the next start.

Damage that only one process of a multi-process run sees (its own shard files) is not agreed
on: that process fails while the others wait in orbax's restore barrier until its timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils
from jax.sharding import Sharding
from orbax.checkpoint import checkpoint_managers as policies

from jaxrlhf.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    config_from_dict,
    config_to_yaml,
)
from jaxrlhf.errors import DataError

__all__ = [
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "Checkpointer",
    "HostState",
    "Restored",
    "abstract_like",
    "state_settings",
]

logger = logging.getLogger(__name__)

PyTree = Any
HOST_FORMAT = 1
DAMAGED_DIR = "damaged"  # under the checkpoint directory; not a step name orbax would list


class CheckpointNotFoundError(FileNotFoundError):
    """No complete checkpoint where one was asked for."""


class CheckpointIOError(DataError):
    """A train checkpoint that cannot be read back (no intact step) or written (a full disk);
    the message is one sentence for the user."""


class _Damaged(Exception):
    """A step that cannot be read back; the message is the reason (internal to `restore`)."""


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


# ----------------------------------------------------------------------------- config vs checkpoint

# Model fields that fix the shapes or the function of the parameters; they count only while the
# model is built from scratch (with a path, the path's config.json gives the architecture).
_ARCH_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
    "num_kv_heads", "head_dim", "tie_word_embeddings", "rope_theta", "rope_scaling",
    "rms_norm_eps",
)  # fmt: skip


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A YAML-shaped config as ``{dotted.key: value}``."""
    if not isinstance(tree, Mapping) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _flat_config(cfg: Config) -> dict[str, Any]:
    """``cfg`` as ``{dotted.key: value}`` in the YAML form a checkpoint stores it in."""
    return _flat(yaml.safe_load(config_to_yaml(cfg)))


def state_settings(cfg: Config) -> dict[str, Any]:
    """The settings a checkpoint's state depends on, by dotted key: a run resumes only with the
    same values. ``critic.enabled`` / ``ref.enabled`` are the effective values (a critic is
    also on when the advantage estimator needs values, a reference when ``algorithm.kl_coef``
    > 0); a model's path and, from scratch, its architecture; a critic's or reference's path
    only while it is kept."""
    keys = ["actor.path"]
    if cfg.actor.path is None:
        keys += [f"actor.{f}" for f in _ARCH_FIELDS]
    for role, used in (("critic", cfg.use_critic), ("ref", cfg.use_ref)):
        keys += [f"{role}.path"] if used else []
    out = {
        k: v
        for k, v in _flat_config(cfg).items()
        if k in keys or k.startswith("actor.rope_scaling.")
    }
    return out | {"critic.enabled": cfg.use_critic, "ref.enabled": cfg.use_ref}


_DERIVED = ("critic.enabled", "ref.enabled")  # effective values, not the raw config entries


def _show(value: Any) -> str:
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _config_changes(saved_yaml: str, cfg: Config) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """(``state_settings`` that differ: key -> (saved, new); the other keys that differ)."""
    saved_raw = yaml.safe_load(saved_yaml)
    if not isinstance(saved_raw, Mapping):
        raise yaml.YAMLError(f"a {type(saved_raw).__name__}, not a mapping")
    saved_flat, new_flat, new = _flat(saved_raw), _flat_config(cfg), state_settings(cfg)
    try:
        saved = state_settings(config_from_dict(saved_raw))
    except (KeyError, TypeError, ValueError):  # an older schema: compare the entries both have
        saved = {k: v for k, v in saved_flat.items() if k in new and k not in _DERIVED}
    blocking = {k: (saved[k], new[k]) for k in sorted(saved.keys() & new.keys())}
    blocking = {k: pair for k, pair in blocking.items() if pair[0] != pair[1]}
    rest = sorted(
        k
        for k in saved_flat.keys() | new_flat.keys()
        if saved_flat.get(k) != new_flat.get(k) and k not in new and k not in saved
    )
    return blocking, rest


def _named_shapes(tree: PyTree) -> dict[str, tuple[int, ...] | None]:
    """Saved-name ("actor.params.embed") -> the shape on disk of every array in ``tree`` (an
    abstract target or orbax's metadata tree); a typed PRNG key is stored as its key data."""

    def shape(x: Any) -> tuple[int, ...] | None:
        dtype = getattr(x, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return tuple(jax.eval_shape(jax.random.key_data, x).shape)
        s = getattr(x, "shape", None)
        return None if s is None else tuple(s)

    flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True), sep=".")
    return {name: shape(x) for name, x in flat.items() if x is not None}


def _tree_differences(saved: PyTree, target: PyTree, limit: int = 3) -> list[str]:
    """How ``target``'s arrays differ from the saved ones (names, shapes), at most ``limit``."""
    a, b = _named_shapes(saved), _named_shapes(target)
    out = [f"{n}: only in the checkpoint" for n in sorted(a.keys() - b.keys())]
    out += [f"{n}: not in the checkpoint" for n in sorted(b.keys() - a.keys())]
    out += [
        f"{n}: saved {list(a[n])}, here {list(b[n])}"
        for n in sorted(a.keys() & b.keys())
        if a[n] is not None and b[n] is not None and a[n] != b[n]
    ]
    return out[:limit] + ([f"{len(out) - limit} more"] if len(out) > limit else [])


# ----------------------------------------------------------------------------- error text


def _chain(err: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and all(err is not e for e in seen):
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _os_error_text(err: BaseException | None) -> str | None:
    """The operating-system error in ``err``'s chain ("No space left on device"), or None;
    TensorStore reports its own as ``[os_error_code='28']`` inside a ValueError."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno is not None:
            return e.strerror or os.strerror(e.errno)
        if m := re.search(r"os_error_code='(\d+)'", str(e)):
            return os.strerror(int(m.group(1)))
    return None


def _reason(err: BaseException, limit: int = 240) -> str:
    """The innermost cause of ``err`` as one short line (TensorStore's spec dump left out)."""
    inner = _chain(err)[-1]
    text = " ".join(str(inner).split("See full TensorStore details")[0].split())
    text = re.sub(r" ?\[tensorstore_spec=.*$", "", text) or type(inner).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quiet_abandoned_reads(unraisable: Any, default: Callable[[Any], None]) -> None:
    """``sys.unraisablehook`` that drops what the array reads a failed restore abandoned leave
    behind, long after `restore` reported the step as damaged in one line: a collected read
    coroutine's own error ("Exception ignored in: <coroutine ...>"), and a read that finishes
    later and hands its result to the restore's event loop, which is closed by then."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and code.co_name == "_read_array_index_and_device_put":
        return
    if _is_closed_loop_callback(unraisable.exc_value, unraisable.exc_traceback):
        return
    default(unraisable)


def _is_closed_loop_callback(err: BaseException | None, tb: Any) -> bool:
    """Whether ``err`` is asyncio's "Event loop is closed", raised by ``call_soon_threadsafe``
    (a tensorstore read completing after its loop was closed)."""
    if not isinstance(err, RuntimeError) or str(err) != "Event loop is closed":
        return False
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "call_soon_threadsafe" in names


class _QuietAbandonedFutures(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" for the tensorstore reads a failed
    restore abandoned (their error is the damage `restore` already reported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Future exception was never retrieved"):
            return True
        err = record.exc_info[1] if record.exc_info else None
        text = f"{record.getMessage()} {err!r}"
        return not ("Error reading" in text and ("OCDBT" in text or "tensorstore" in text))


_QUIET_FUTURES = _QuietAbandonedFutures()


class _QuietWriteErrors(logging.Filter):
    """Drops orbax's background-thread tracebacks of a failed write (a full disk): the error
    reaches the caller at the next save / wait / close as one `CheckpointIOError` sentence."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return _os_error_text(err) is None and "os_error_code=" not in record.getMessage()


_QUIET = _QuietWriteErrors()


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
        self._pending: int | None = None  # the step an asynchronous save is still writing
        logging.getLogger("absl").addFilter(_QUIET)  # orbax logs through absl
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
        self.wait()  # a failed previous write surfaces here, naming its own step
        if step in self._mgr.all_steps():
            return False
        host = host or HostState()
        doc = {"format": HOST_FORMAT, "step": step, **_jsonable(dataclasses.asdict(host))}
        best = None
        if metrics is not None and self.keep_best_metric in metrics:
            value = float(metrics[self.keep_best_metric])
            best = {self.keep_best_metric: value} if math.isfinite(value) else None
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(doc))
        with self._write_errors(step):
            saved = self._mgr.save(step, args=args, metrics=best, force=True)
        self._pending = step if saved else None
        if saved:
            logger.info("checkpoint: saving step %d to %s", step, self.directory)
        return bool(saved)

    def restore(
        self,
        target: PyTree | None = None,
        *,
        step: int | None = None,
        config: Config | None = None,
        report: Callable[[str], None] | None = None,
    ) -> Restored:
        """Read ``step`` (default: the newest intact one) into ``target``'s structure.

        ``target``: abstract or concrete arrays (see `abstract_like`); restored arrays get its
        shardings, which may differ from the saved ones (another mesh, one device). With None,
        the saved structure comes back as nested dicts of arrays. ``config``: the run's config,
        compared with the one the step was saved with (`ConfigError` when they do not fit).
        Without ``step``, a damaged step is skipped for the one before it and moved aside;
        ``report`` (default: a warning log) gets one line per step skipped and per note.
        """
        report = report or logger.warning
        steps = self.all_steps()
        if step is not None and step not in steps:
            raise CheckpointNotFoundError(f"no complete step {step} in {self.directory}.")
        if not steps:
            raise CheckpointNotFoundError(f"no complete checkpoint in {self.directory}.")
        if target is not None:
            target = jax.tree.map(
                lambda x: (
                    x
                    if isinstance(x, jax.ShapeDtypeStruct)
                    else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                ),
                target,
            )
        damaged: dict[int, str] = {}
        for candidate in [step] if step is not None else reversed(steps):
            try:
                restored = self._restore_step(candidate, target, config, report)
            except _Damaged as why:
                damaged[candidate] = str(why)
                continue
            for s, moved in self._set_aside(sorted(damaged)).items():
                report(
                    f"checkpoint step {s} in {self.directory} is damaged ({damaged[s]}): "
                    f"skipped, and moved to {moved}"
                )
            return restored
        newest = max(damaged)
        older = ", ".join(str(s) for s in sorted(damaged)[:-1])
        also = f" (so {'are steps' if ',' in older else 'is step'} {older})" if older else ""
        raise CheckpointIOError(
            f"checkpoint step {newest} in {self.directory} is damaged: {damaged[newest]}{also}; "
            "repair or remove it, or set checkpoint.resume=false."
        )

    def _restore_step(
        self,
        step: int,
        target: PyTree | None,
        config: Config | None,
        report: Callable[[str], None],
    ) -> Restored:
        """One step, checked in the order that names the real problem: the host JSON, the
        config it holds against ``config``, the array metadata against ``target``, then the
        arrays themselves (reading them back is the check). Raises `_Damaged` with the reason,
        or `ConfigError` when the step is intact but does not fit."""
        where = f"checkpoint step {step} in {self.directory}"
        try:
            host_args = ocp.args.Composite(host=ocp.args.JsonRestore())
            doc = dict(self._mgr.restore(step, args=host_args)["host"])
        except Exception as err:
            raise _Damaged(f"host/ is unreadable: {_reason(err)}") from None
        if doc.pop("format", None) != HOST_FORMAT or doc.pop("step", None) != step:
            raise _Damaged(f"host/ is not a jaxrlhf host state of step {step}")
        try:
            host = HostState(**doc)
        except TypeError as err:
            raise _Damaged(f"host/ is not a jaxrlhf host state: {err}") from None
        notes: list[str] = []
        if config is not None and host.config is not None:
            try:
                changed, others = _config_changes(host.config, config)
            except yaml.YAMLError as err:
                raise _Damaged(f"host/ holds a config that is not YAML: {_reason(err)}") from None
            if changed:
                was = ", ".join(f"{k}={_show(old)}" for k, (old, _) in changed.items())
                now = ", ".join(_show(new) for _, new in changed.values())
                raise ConfigError(
                    f"{where} was saved with {was}; this config has {now}: resume with the "
                    "same model or set checkpoint.resume=false."
                )
            notes = others
        state_dir = self.directory / str(step) / "state"
        if not (state_dir / "_METADATA").is_file():
            raise _Damaged("state/_METADATA is missing")
        try:
            saved_tree = ocp.StandardCheckpointHandler().metadata(state_dir).tree
        except Exception as err:
            raise _Damaged(f"state/_METADATA is unreadable: {_reason(err)}") from None
        if target is not None and (diff := _tree_differences(saved_tree, target)):
            differ = f"; settings that differ: {', '.join(notes)}" if notes else ""
            raise ConfigError(
                f"{where} holds arrays this run does not build ({'; '.join(diff)}){differ}: "
                "resume with the same settings or set checkpoint.resume=false."
            )
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
            state = self._mgr.restore(step, args=args)["state"]
        except Exception as err:
            if getattr(sys.unraisablehook, "func", None) is not _quiet_abandoned_reads:
                default = sys.unraisablehook
                sys.unraisablehook = functools.partial(_quiet_abandoned_reads, default=default)
            logging.getLogger("asyncio").addFilter(_QUIET_FUTURES)  # once: filters are a set
            raise _Damaged(f"an array in state/ is unreadable: {_reason(err)}") from None
        if notes:
            shown = ", ".join(notes[:6]) + (f" and {len(notes) - 6} more" if len(notes) > 6 else "")
            report(f"{where} was saved with other values of {shown}; this run uses its own")
        return Restored(step=step, state=state, host=host)

    def _set_aside(self, steps: list[int]) -> dict[int, Path]:
        """Move damaged ``steps`` to ``<dir>/damaged/`` (out of orbax's sight, kept for
        inspection); returns where each went. Process 0 moves, the others wait for it."""
        moved: dict[int, Path] = {}
        for s in steps:
            dest, n = self.directory / DAMAGED_DIR / str(s), 1
            while dest.exists():
                dest, n = self.directory / DAMAGED_DIR / f"{s}-{n}", n + 1
            if jax.process_index() == 0:
                dest.parent.mkdir(exist_ok=True)
                (self.directory / str(s)).rename(dest)
            moved[s] = dest
        if steps:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("jaxrlhf.checkpoint.set_aside")
            self._mgr.reload()
        return moved

    def maybe_restore(
        self,
        target: PyTree | None = None,
        *,
        config: Config | None = None,
        report: Callable[[str], None] | None = None,
    ) -> Restored | None:
        """The newest intact checkpoint if ``cfg.resume`` is on and one exists, else None."""
        if not self.cfg.resume or self.latest_step() is None:
            return None
        restored = self.restore(target, config=config, report=report)
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
        """Block until the pending save is on disk (`CheckpointIOError` if it failed)."""
        step, self._pending = self._pending, None
        with self._write_errors(step):
            self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for the pending save and release the manager's threads."""
        try:
            self.wait()
        finally:
            try:
                self._mgr.close()
            except Exception:  # the failed write already raised from wait()
                logger.debug("checkpoint: closing after a failed write", exc_info=True)

    @contextlib.contextmanager
    def _write_errors(self, step: int | None) -> Iterator[None]:
        """An operating-system error writing ``step`` (a full disk) becomes one sentence."""
        try:
            yield
        except Exception as err:
            text = _os_error_text(err)
            if text is None or step is None:
                raise
            self._mgr.reload()
            latest = self._mgr.latest_step()
            kept = "no checkpoint" if latest is None else f"step {latest}"
            raise CheckpointIOError(
                f"could not write checkpoint step {step} to {self.directory}: {text}; "
                f"{kept} remains the latest."
            ) from None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
