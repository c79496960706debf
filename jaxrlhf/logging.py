"""What the user sees: a progress bar and a compact line per step, metrics in JSONL /
TensorBoard / W&B, per-MFC timings, and at the end a PNG plot and a before/after eval summary.

The coordinator hands over one dict of (host or device) scalars per step; they are fetched from
the device in one transfer per step, never one per metric::

    logger = MetricsLogger.from_config(cfg)
    for step in range(1, cfg.experiment.total_steps + 1):
        with logger.time("actor_gen"):
            batch = jax.block_until_ready(generate(...))  # block: time the work, not dispatch
        logger.log(step, {"reward/mean": r_mean, "actor/grad_norm": gnorm, ...})
    logger.close()
    plot_metrics(logger.jsonl_path, f"{cfg.experiment.output_dir}/metrics.png")

Metric names are ``group/name``. The console line and the plot read these (others are logged
as given): ``reward/mean``, ``reward/std``, ``response_len/mean``, ``actor/kl_ref``,
``actor/entropy``, ``actor/clip_frac``, ``actor/grad_norm``, ``perf/tokens_per_s``,
``eval/reward``, ``time/step`` (filled in from the wall clock when absent) and ``time/<mfc>``
(from `MetricsLogger.time`). Suggested others: ``response_len/max``,
``response_len/truncated_frac``, ``actor/approx_kl``, ``actor/lr``, ``actor/logprob_gap``,
``reward/zero_std_group_frac``, ``critic/loss``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from jaxrlhf.config import Config, ConfigError, LoggingConfig, config_to_dict

__all__ = [
    "PLOT_PANELS",
    "STEP_LINE_FIELDS",
    "MFCTimer",
    "MetricsLogger",
    "eval_summary_line",
    "format_eval_table",
    "format_step_line",
    "make_dir",
    "plot_metrics",
    "read_metrics",
    "setup_python_logging",
    "to_host_scalars",
]

log = logging.getLogger("jaxrlhf")

# (label, mean key, std key or None) shown on the per-step line, in this order, when present.
STEP_LINE_FIELDS: tuple[tuple[str, str, str | None], ...] = (
    ("reward", "reward/mean", "reward/std"),
    ("len", "response_len/mean", None),
    ("kl", "actor/kl_ref", None),
    ("ent", "actor/entropy", None),
    ("clip", "actor/clip_frac", None),
    ("gnorm", "actor/grad_norm", None),
    ("eval", "eval/reward", None),
    # supervised trainers (launchers/sft.py, launchers/rm.py)
    ("loss", "train/loss", None),
    ("acc", "train/accuracy", None),
    ("gnorm", "train/grad_norm", None),
    ("eval loss", "eval/loss", None),
    ("eval acc", "eval/accuracy", None),
)

# (title, key, std key or None) of each panel of `plot_metrics`.
PLOT_PANELS: tuple[tuple[str, str, str | None], ...] = (
    ("reward", "reward/mean", "reward/std"),
    ("response length (tokens)", "response_len/mean", None),
    ("KL to reference", "actor/kl_ref", None),
    ("entropy", "actor/entropy", None),
)


def setup_python_logging(level: str = "info") -> None:
    """Send jaxrlhf's Python log records to stderr as ``LEVEL message`` lines at ``level``."""
    logger = logging.getLogger("jaxrlhf")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)


# ----------------------------------------------------------------------------- values and text


def to_host_scalars(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """Python numbers from a dict of Python / numpy / jax scalars, with one device transfer.

    Raises TypeError naming the metric if a value is not a single number.
    """
    jax = sys.modules.get("jax")  # a jax value implies jax is imported; never import it here
    if jax is not None and any(isinstance(v, jax.Array) for v in metrics.values()):
        metrics = jax.device_get(dict(metrics))  # fetches every array in one go
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "V" and "float" in arr.dtype.name:  # ml_dtypes: bfloat16, fp8
            arr = arr.astype(np.float32)
        if arr.size != 1 or arr.dtype.kind not in "biuf":
            what = f"shape {arr.shape}" if arr.size != 1 else f"dtype {arr.dtype}"
            raise TypeError(f"metric {key!r} has {what}; only single real numbers are logged")
        x = arr.reshape(())[()]
        # float32 / bf16: the shortest decimal that round-trips (0.1, not 0.10000000149011612)
        x = float(str(x)) if arr.dtype.kind == "f" and arr.dtype.itemsize < 8 else x.item()
        out[key] = int(x) if isinstance(x, bool) else x
    return out


# Metrics that depend on wall time: left out of the history that resumed runs compare.
TIMING_PREFIXES = ("time/", "perf/")


def history_entry(logged: Mapping[str, Any]) -> dict[str, Any]:
    """A logged step's metrics without the timing ones (what a run's history keeps)."""
    return {k: v for k, v in logged.items() if not k.startswith(TIMING_PREFIXES)}


def _num(x: float) -> str:
    """Compact number: 3 significant digits, no exponent between 1e-3 and 1e4."""
    if not math.isfinite(x):
        return str(x)
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1000:
        return f"{x:.0f}"
    return f"{x:.3g}" if ax >= 1e-3 else f"{x:.1e}"


def format_step_line(step: int, total_steps: int, metrics: Mapping[str, float]) -> str:
    """E.g. ``step 12/100 | reward 0.41±0.12 | len 18.2 | kl 0.003 | ent 1.9 | clip 0.02 |
    gnorm 0.8 | 1.2s``; fields whose metric is absent are left out."""
    parts = [f"step {step}/{total_steps}"]
    for label, key, std_key in STEP_LINE_FIELDS:
        if key in metrics:
            spread = f"±{_num(metrics[std_key])}" if std_key and std_key in metrics else ""
            parts.append(f"{label} {_num(metrics[key])}{spread}")
    if "perf/tokens_per_s" in metrics:
        parts.append(f"{metrics['perf/tokens_per_s']:.0f} tok/s")
    if "time/step" in metrics:
        parts.append(f"{metrics['time/step']:.1f}s")
    return " | ".join(parts)


def format_eval_table(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    """A before/after table of eval metrics (rows: the union of keys, ``before`` order first)."""
    keys = list(dict.fromkeys([*before, *after]))
    width = max([len("metric"), *map(len, keys)])

    def cell(x: float | None) -> str:
        return f"{x:>10.3f}" if x is not None else f"{'-':>10}"

    lines = [f"{'metric':<{width}}  {'before':>10}  {'after':>10}  {'change':>10}"]
    for key in keys:
        b, a = before.get(key), after.get(key)
        change = f"{a - b:>+10.3f}" if a is not None and b is not None else f"{'-':>10}"
        lines.append(f"{key:<{width}}  {cell(b)}  {cell(a)}  {change}")
    return "\n".join(lines)


def eval_summary_line(before: float, after: float, steps: int, seconds: float) -> str:
    """The run's last line: ``eval reward: 0.312 -> 0.645 (100 steps, 412 s)``."""
    return f"eval reward: {before:.3f} -> {after:.3f} ({steps} steps, {seconds:.0f} s)"


# ----------------------------------------------------------------------------- timing


class MFCTimer:
    """Accumulates wall seconds per name across ``with timer("actor_gen"):`` blocks.

    JAX dispatches asynchronously: block on the results inside the block
    (``jax.block_until_ready``) or the time is the dispatch time only.
    """

    def __init__(self) -> None:
        self._seconds: defaultdict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """``{"time/<name>": seconds}`` accumulated since the last pop; resets."""
        out = {f"time/{name}": s for name, s in self._seconds.items()}
        self._seconds.clear()
        return out


# ----------------------------------------------------------------------------- directories


def make_dir(path: str | Path, key: str) -> Path:
    """Create directory ``path`` (the value of config key ``key``) and check that files can be
    written in it; a path that cannot serve is a one-sentence `ConfigError` naming the key."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # /proc, a read-only mount: mkdir alone passes
            pass
    except OSError as e:
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            why = f"{str(blocker)!r} is a file, not a directory"
        else:
            why = e.strerror or type(e).__name__
            if e.filename is not None and Path(e.filename) != path:
                why = f"{why}: {e.filename!r}"
        raise ConfigError(
            f"{key}={str(path)!r} cannot be created or written ({why}); choose a writable path."
        ) from None
    return path


# ----------------------------------------------------------------------------- sinks


class _JsonlSink:
    """One JSON object per logged step, flushed at once (non-finite values become null).

    ``append``: a resumed run keeps the records up to ``start_step`` (the restored step) and
    drops later ones, which a run killed after logging them but before their checkpoint left
    behind and the resumed run writes again, so each step is in the file once.
    """

    def __init__(self, path: Path, append: bool, start_step: int = 0) -> None:
        self.path = path
        if append and path.exists():
            _keep_records_through(path, start_step)
        self._file = path.open("a" if append else "w", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, float | int], wall_s: float) -> None:
        clean = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
        record = {"step": step, "wall_s": round(wall_s, 3), **clean}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _keep_records_through(path: Path, last_step: int) -> None:
    """Rewrite JSONL ``path`` without the records past ``last_step`` (and any line cut short by
    a kill mid-write); atomic, and the file is left alone when nothing is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if step <= last_step and line.endswith("\n"):
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


class _TensorBoardSink:
    def __init__(
        self, logdir: Path, run_config: Mapping[str, Any] | None, purge_step: int | None = None
    ) -> None:
        from tensorboardX import SummaryWriter  # optional dependency; checked by the caller

        # purge_step: TensorBoard hides the events a killed run wrote past the restored step.
        self._writer = SummaryWriter(logdir=str(logdir), purge_step=purge_step)
        if run_config is not None:
            text = json.dumps(run_config, indent=2, default=str)
            self._writer.add_text("config", f"```\n{text}\n```", 0)

    def write(self, step: int, metrics: Mapping[str, float | int]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandbSink:
    def __init__(
        self,
        project: str,
        name: str,
        directory: Path,
        run_config: Mapping[str, Any] | None,
        mode: str | None,
        resume: bool = False,
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "logging.wandb is true but the wandb package is not installed; "
                "run 'pip install wandb' or set logging.wandb=false"
            ) from None
        # A resumed run continues the W&B run of its output directory (the id kept in
        # WANDB_ID_FILE); W&B ignores re-logged steps at or below its last one, which a
        # deterministic resume recomputes identically.
        id_file = directory / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        # mode None: wandb's default, which honours WANDB_MODE (offline needs no network).
        self._run = wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume="allow",
            dir=str(directory),
            config=dict(run_config) if run_config is not None else None,
            mode=mode,
            reinit="finish_previous",
        )

    def write(self, step: int, metrics: Mapping[str, float | int]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


WANDB_ID_FILE = "wandb_run_id"  # in the output directory: the W&B run a resumed run continues


def _tensorboard_available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- the logger


class MetricsLogger:
    """Host-side metric sinks for one run (only process 0 writes: pass ``is_main``).

    Per logged step (every ``cfg.log_every`` steps, and the last): a console line, a JSONL
    record in ``<output_dir>/metrics.jsonl``, TensorBoard scalars under
    ``<output_dir>/tensorboard`` (when ``cfg.tensorboard`` and tensorboardX is installed) and a
    W&B log (when ``cfg.wandb``; ``wandb_mode`` overrides ``WANDB_MODE``). ``resume`` (a run
    restored at ``start_step``) continues the history: the JSONL file is appended to after
    dropping its records past ``start_step``, TensorBoard purges its events past it, and W&B
    resumes the output directory's run.
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        output_dir: str | Path,
        total_steps: int,
        *,
        start_step: int = 0,
        run_name: str = "jaxrlhf",
        run_config: Mapping[str, Any] | None = None,
        resume: bool = False,
        is_main: bool = True,
        stream: IO[str] | None = None,
        wandb_mode: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.timer = MFCTimer()
        self._stream = stream
        self._pending: dict[str, Any] = {}
        self._start = self._last = time.perf_counter()
        self._bar: Any = None
        self._jsonl: _JsonlSink | None = None
        self._tb: _TensorBoardSink | None = None
        self._wandb: _WandbSink | None = None
        if not is_main:
            return
        make_dir(self.output_dir, "experiment.output_dir")
        if cfg.wandb:  # first: the one sink that can refuse to start (not installed)
            project = cfg.wandb_project or "jaxrlhf"
            self._wandb = _WandbSink(
                project, run_name, self.output_dir, run_config, wandb_mode, resume=resume
            )
        if cfg.jsonl:
            self._jsonl = _JsonlSink(self.jsonl_path, append=resume, start_step=start_step)
        if cfg.tensorboard:
            if _tensorboard_available():
                purge = start_step + 1 if resume else None
                self._tb = _TensorBoardSink(self.output_dir / "tensorboard", run_config, purge)
            else:
                log.warning("logging.tensorboard is on but tensorboardX is not installed; skipped")
        if cfg.progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (CI logs keep only the lines)
            self._bar = tqdm(
                total=total_steps, initial=start_step, desc=run_name, unit="step", disable=None
            )
        self._last = time.perf_counter()  # the first step's time excludes setting up sinks

    @classmethod
    def from_config(cls, cfg: Config, *, start_step: int = 0, **kwargs: Any) -> MetricsLogger:
        """A logger for experiment ``cfg``; resuming (start_step > 0) appends to the JSONL."""
        kwargs.setdefault("resume", start_step > 0)
        return cls(
            cfg.logging,
            str(cfg.experiment.output_dir),
            cfg.experiment.total_steps,
            start_step=start_step,
            run_name=cfg.experiment.name,
            run_config=config_to_dict(cfg),
            **kwargs,
        )

    @property
    def jsonl_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def time(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Context manager adding its wall seconds to ``time/<name>`` of this step."""
        return self.timer(name)

    def update(self, metrics: Mapping[str, Any]) -> None:
        """Stage metrics for the next `log` call without touching their (device) values."""
        self._pending.update(metrics)

    def log(self, step: int, metrics: Mapping[str, Any] | None = None) -> dict[str, float | int]:
        """Finish step ``step``: merge staged metrics, timings and ``time/step``, convert them
        with one device transfer and write every sink. Returns the host values ({} when the
        step is not logged or this is not the main process)."""
        now = time.perf_counter()
        raw = {**self._pending, **(metrics or {}), **self.timer.pop()}
        raw.setdefault("time/step", now - self._last)
        self._pending, self._last = {}, now
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))
        due = step % self.cfg.log_every == 0 or step >= self.total_steps
        if not (self.is_main and due):
            return {}
        values = to_host_scalars(raw)
        self._print(format_step_line(step, self.total_steps, values))
        if self._jsonl is not None:
            self._jsonl.write(step, values, now - self._start)
        if self._tb is not None:
            self._tb.write(step, values)
        if self._wandb is not None:
            self._wandb.write(step, values)
        return values

    def print(self, text: str) -> None:
        """Print above the progress bar (e.g. the eval table and the final line)."""
        if self.is_main:
            self._print(text)

    def _print(self, text: str) -> None:
        stream = self._stream or sys.stdout
        if self._bar is not None and not self._bar.disable:
            self._bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def close(self) -> None:
        """Close the bar and every sink (safe to call twice)."""
        if self._bar is not None:
            self._bar.close()
        for sink in (self._jsonl, self._tb, self._wandb):
            if sink is not None:
                sink.close()
        self._bar = self._jsonl = self._tb = self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- plot


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics JSONL file sorted by step; a step logged twice (a resumed run)
    keeps its last record."""
    by_step: dict[int, dict[str, Any]] = {}
    with Path(jsonl_path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(jsonl_path: str | Path, png_path: str | Path) -> Path:
    """Write a PNG of reward (± std, eval points), response length, KL and entropy over steps."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise RuntimeError("plot_metrics needs matplotlib; run 'pip install matplotlib'") from None
    records = read_metrics(jsonl_path)
    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without pyplot: leaves the user's global backend alone
    axes = fig.subplots(2, 2).ravel()
    for ax, (title, key, std_key) in zip(axes, PLOT_PANELS, strict=True):
        steps, ys, stds = _series(records, key, std_key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if steps.size:
            ax.plot(steps, ys, marker="." if steps.size < 50 else None, label="train")
            if std_key is not None and np.isfinite(stds).any():
                ax.fill_between(steps, ys - stds, ys + stds, alpha=0.2, label="± std")
        else:
            ax.text(0.5, 0.5, f"no {key} data", ha="center", va="center", transform=ax.transAxes)
        if key == "reward/mean":
            e_steps, e_ys, _ = _series(records, "eval/reward", None)
            if e_steps.size:
                ax.plot(e_steps, e_ys, "o--", label="eval")
            if steps.size or e_steps.size:
                ax.legend(loc="best", fontsize="small")
    fig.suptitle(Path(jsonl_path).parent.name or "metrics")
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _series(
    records: list[dict[str, Any]], key: str, std_key: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, values, stds) of the records that have ``key`` (null -> NaN, missing std -> NaN)."""
    rows = [r for r in records if key in r]

    def col(k: str | None) -> np.ndarray:
        vals = [r.get(k) if k else None for r in rows]
        return np.array([np.nan if v is None else v for v in vals], dtype=np.float64)

    return np.array([r["step"] for r in rows], dtype=np.int64), col(key), col(std_key)


_COMPILE_EVENT = "/jax/core/compile/"  # jaxpr tracing, MLIR lowering and backend compilation
_compile_totals = {"seconds": 0.0, "count": 0}
_compile_lock = threading.Lock()
_compile_listening = False


def _on_compile_event(event: str, seconds: float, **_: Any) -> None:
    if event.startswith(_COMPILE_EVENT):
        with _compile_lock:
            _compile_totals["seconds"] += seconds
            _compile_totals["count"] += event.endswith("backend_compile_duration")


def compile_totals() -> dict[str, float]:
    """This process's cumulative compilation so far: ``seconds`` (tracing, lowering and XLA
    compilation) and ``count`` (XLA compilations). Callers take differences, e.g. per step to
    see recompiles (``perf/compile_s``)."""
    global _compile_listening
    with _compile_lock:
        if not _compile_listening:  # from the first call on: coordinators call it at start
            import jax

            jax.monitoring.register_event_duration_secs_listener(_on_compile_event)
            _compile_listening = True
        return dict(_compile_totals)
