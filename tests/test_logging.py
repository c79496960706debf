"""What the user sees: step line, JSONL / TensorBoard / W&B sinks, timings, plot, eval summary."""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import logging as jlog
from jaxrlhf.config import ConfigError, LoggingConfig, load_config
from jaxrlhf.logging import (
    MetricsLogger,
    eval_summary_line,
    format_eval_table,
    format_step_line,
    plot_metrics,
    read_metrics,
    to_host_scalars,
)

EXAMPLE = {
    "reward/mean": 0.41,
    "reward/std": 0.12,
    "response_len/mean": 18.2,
    "actor/kl_ref": 0.003,
    "actor/entropy": 1.9,
    "actor/clip_frac": 0.02,
    "actor/grad_norm": 0.8,
    "time/step": 1.23,
}


def quiet(**kwargs) -> LoggingConfig:
    return LoggingConfig(progress=False, **kwargs)


def make_logger(tmp_path: Path, total: int = 3, **kwargs) -> tuple[MetricsLogger, io.StringIO]:
    out = io.StringIO()
    cfg = kwargs.pop("cfg", quiet())
    return MetricsLogger(cfg, tmp_path / "run", total, stream=out, **kwargs), out


# ----------------------------------------------------------------------------- text


def test_step_line_format() -> None:
    assert format_step_line(12, 100, EXAMPLE) == (
        "step 12/100 | reward 0.41±0.12 | len 18.2 | kl 0.003 | ent 1.9 | clip 0.02 | "
        "gnorm 0.8 | 1.2s"
    )
    sparse = {"reward/mean": 0.5, "actor/kl_ref": 2.5e-5, "response_len/mean": 1234.4}
    assert format_step_line(1, 2, sparse) == "step 1/2 | reward 0.5 | len 1234 | kl 2.5e-05"
    extra = {"eval/reward": 0.625, "perf/tokens_per_s": 1530.7, "time/step": 0.04}
    assert format_step_line(3, 3, extra) == "step 3/3 | eval 0.625 | 1531 tok/s | 0.0s"


def test_eval_table_and_final_line() -> None:
    table = format_eval_table({"reward": 0.3125, "len": 20.0}, {"reward": 0.65, "acc": 0.5})
    assert table.splitlines() == [
        "metric      before       after      change",
        "reward       0.312       0.650      +0.338",
        "len         20.000           -           -",
        "acc              -       0.500           -",
    ]
    line = eval_summary_line(0.3125, 0.6451, 100, 411.6)
    assert line == "eval reward: 0.312 -> 0.645 (100 steps, 412 s)"
    assert re.fullmatch(r"eval reward: \d\.\d{3} -> \d\.\d{3} \(\d+ steps, \d+ s\)", line)


# ----------------------------------------------------------------------------- values


def test_to_host_scalars_accepts_jax_numpy_python(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real(x))
    values = to_host_scalars(
        {
            "a": jnp.float32(0.1),
            "b": jnp.array([2.5]),
            "c": jnp.int32(3),
            "d": np.float32(0.2),
            "e": 4,
            "f": True,
            "g": jnp.bfloat16(0.5),
        }
    )
    assert calls == [1]  # one transfer for the whole step
    assert values == {"a": 0.1, "b": 2.5, "c": 3, "d": 0.2, "e": 4, "f": 1, "g": 0.5}
    assert all(type(v) in (int, float) for v in values.values())
    with pytest.raises(TypeError, match=r"metric 'v' has shape \(3,\); only single real numbers"):
        to_host_scalars({"v": np.zeros(3)})


# ----------------------------------------------------------------------------- logger


def test_logger_writes_jsonl_and_step_lines(tmp_path: Path) -> None:
    logger, out = make_logger(tmp_path)
    for step in (1, 2, 3):
        with logger.time("actor_gen"):
            time.sleep(0.01)
        with logger.time("actor_gen"):
            pass
        logger.update({"reward/mean": jnp.float32(0.25 * step)})  # staged, fetched at log
        logger.log(step, {"reward/std": np.float32(0.5), "actor/kl_ref": 0.001 * step, "n": step})
        # flushed: readable while the run goes on
        assert len(read_metrics(logger.jsonl_path)) == step
    logger.close()
    logger.close()  # idempotent

    lines = logger.jsonl_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["reward/mean"] for r in records] == [0.25, 0.5, 0.75]
    assert [r["actor/kl_ref"] for r in records] == [0.001, 0.002, 0.003]
    assert all(r["reward/std"] == 0.5 and r["time/actor_gen"] >= 0.01 for r in records)
    assert all(r["time/step"] >= r["time/actor_gen"] for r in records)
    printed = out.getvalue().splitlines()
    assert len(printed) == 3
    assert re.fullmatch(r"step 2/3 \| reward 0\.5±0\.5 \| kl 0\.002 \| \d+\.\ds", printed[1])


def test_log_every_non_finite_and_resume(tmp_path: Path) -> None:
    logger, out = make_logger(tmp_path, total=5, cfg=quiet(log_every=2))
    logged = [
        logger.log(s, {"reward/mean": float(s), "actor/kl_ref": float("nan")}) for s in range(1, 6)
    ]
    logger.close()
    assert [bool(v) for v in logged] == [False, True, False, True, True]  # every 2nd + the last
    records = read_metrics(logger.jsonl_path)
    assert [r["step"] for r in records] == [2, 4, 5]
    assert records[0]["actor/kl_ref"] is None  # strict JSON: NaN becomes null
    assert len(out.getvalue().splitlines()) == 3

    resumed, _ = make_logger(tmp_path, total=6, resume=True, start_step=5)
    resumed.log(5, {"reward/mean": 50.0})  # a step re-run after a restart: the last record wins
    resumed.log(6, {"reward/mean": 6.0})
    resumed.close()
    assert [(r["step"], r["reward/mean"]) for r in read_metrics(logger.jsonl_path)] == [
        (2, 2.0),
        (4, 4.0),
        (5, 50.0),
        (6, 6.0),
    ]


def test_resume_keeps_history_through_repeated_resumes(tmp_path: Path) -> None:
    """Each resume appends after dropping the records past the restored step (a run killed after
    logging them but before their checkpoint), and a line cut short by the kill; after any
    number of resumes every step is in the file exactly once, with the values last written."""
    expected: dict[int, float] = {}

    def leg(start: int, stop: int, value: float, *, cut: bool = False) -> None:
        logger, _ = make_logger(tmp_path, total=10, resume=start > 0, start_step=start)
        for step in range(start + 1, stop + 1):
            logger.log(step, {"reward/mean": value + step})
            expected[step] = value + step
        logger.close()
        if cut:  # a kill in the middle of writing a record
            with logger.jsonl_path.open("a") as f:
                f.write('{"step": 99, "rew')

    leg(0, 6, 0.0, cut=True)  # checkpoint at 4; steps 5, 6 and half a record are past it
    leg(4, 8, 100.0)  # checkpoint at 8
    leg(8, 8, 200.0)  # resumed at the last checkpoint, nothing new: the file is kept as it is
    leg(8, 10, 300.0)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole JSON again
    assert [r["step"] for r in records] == list(range(1, 11))
    assert {r["step"]: r["reward/mean"] for r in records} == expected
    assert expected[5] == 105.0 and expected[9] == 309.0  # re-run steps: the resumed values


def test_fresh_run_starts_a_new_file(tmp_path: Path) -> None:
    logger, _ = make_logger(tmp_path, total=3)
    logger.log(1, {"reward/mean": 1.0})
    logger.close()
    again, _ = make_logger(tmp_path, total=3)  # no resume: a new run in the same directory
    again.log(1, {"reward/mean": 2.0})
    again.close()
    assert [r["reward/mean"] for r in read_metrics(again.jsonl_path)] == [2.0]


def test_output_dir_that_cannot_serve_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    cases = {
        tmp_path / "afile" / "run": f"{str(tmp_path / 'afile')!r} is a file, not a directory",
        tmp_path / "afile": f"{str(tmp_path / 'afile')!r} is a file, not a directory",
        Path("/proc/jaxrlhf_run"): "No such file or directory",
    }
    for path, why in cases.items():
        with pytest.raises(ConfigError) as info:
            MetricsLogger(quiet(), path, 3)
        assert str(info.value) == (
            f"experiment.output_dir={str(path)!r} cannot be created or written ({why}); "
            "choose a writable path."
        )
    assert jlog.make_dir(tmp_path / "a" / "b", "checkpoint.dir").is_dir()


def _tfrecords(path: Path) -> list[bytes]:
    """The records of a TFRecord file (length, its CRC, data, the data's CRC)."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
    return out


def test_tensorboard_resume_purges_steps_past_the_restored_one(tmp_path: Path) -> None:
    """The resumed writer starts with a SessionLog START at the first re-run step: TensorBoard
    then drops the events a killed run wrote at or past it."""
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    cfg = quiet(tensorboard=True)
    first, _ = make_logger(tmp_path, total=6, cfg=cfg)
    for step in range(1, 7):
        first.log(step, {"reward/mean": float(step)})
    first.close()
    time.sleep(1.1)  # event file names carry the second they were opened in
    resumed, _ = make_logger(tmp_path, total=6, cfg=cfg, resume=True, start_step=4)
    for step in (5, 6):
        resumed.log(step, {"reward/mean": 10.0 * step})
    resumed.close()
    files = sorted((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2

    def events(path: Path) -> list[Event]:
        return [Event.FromString(r) for r in _tfrecords(path)]

    starts = [(e.step, e.session_log.status) for f in files for e in events(f)
              if e.HasField("session_log")]  # fmt: skip
    assert starts == [(5, SessionLog.START)]
    scalars = [(e.step, v.simple_value) for e in events(files[1]) for v in e.summary.value
               if v.tag == "reward/mean"]  # fmt: skip
    assert scalars == [(5, 50.0), (6, 60.0)]


def test_non_main_process_writes_nothing(tmp_path: Path) -> None:
    logger, out = make_logger(tmp_path, is_main=False)
    assert logger.log(1, {"reward/mean": 1.0}) == {}
    logger.print("hidden")
    logger.close()
    assert not (tmp_path / "run").exists() and out.getvalue() == ""


def test_from_config_uses_experiment_settings(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"experiment.output_dir={tmp_path / 'exp'}",
            "experiment.total_steps=7",
            "logging.progress=false",
        ],
    )
    out = io.StringIO()
    with MetricsLogger.from_config(cfg, stream=out) as logger:
        logger.log(7, {"reward/mean": 1.0})
        logger.print("done")
    assert logger.jsonl_path == tmp_path / "exp" / "metrics.jsonl"
    assert out.getvalue().splitlines()[0].startswith("step 7/7 | reward 1 | ")
    assert out.getvalue().splitlines()[1] == "done"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    cfg = LoggingConfig(progress=True)
    logger, out = make_logger(tmp_path, total=4, cfg=cfg, start_step=1)
    assert logger._bar is not None and logger._bar.n == 1
    logger.log(3, {"reward/mean": 1.0})
    assert logger._bar.n == 3
    logger.close()
    assert "3/4" in sys.stderr.getvalue()  # the bar
    assert out.getvalue().startswith("step 3/4 | reward 1 | ")  # the line, above the bar
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal (CI): lines only
    logger, out = make_logger(tmp_path, total=4, cfg=cfg)
    logger.log(1, {"reward/mean": 1.0})
    logger.close()
    assert sys.stderr.getvalue() == "" and out.getvalue().startswith("step 1/4 | ")


def test_tensorboard_event_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    logger, _ = make_logger(tmp_path, cfg=quiet(tensorboard=True), run_config={"a": 1})
    logger.log(1, {"reward/mean": jnp.float32(0.5)})
    logger.close()
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100


def test_tensorboard_missing_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(jlog, "_tensorboard_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="jaxrlhf"):
        logger, _ = make_logger(tmp_path, cfg=quiet(tensorboard=True))
    logger.log(1, {"reward/mean": 1.0})
    logger.close()
    assert [r.getMessage() for r in caplog.records] == [
        "logging.tensorboard is on but tensorboardX is not installed; skipped"
    ]
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_wandb_offline_run_creates_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_cfg"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger, _ = make_logger(tmp_path, cfg=quiet(wandb=True, wandb_project="t"), run_config={"a": 1})
    logger.log(1, {"reward/mean": jnp.float32(0.5)})
    logger.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    # A resumed run continues the W&B run of its output directory; a fresh one starts another.
    run_id = (tmp_path / "run" / jlog.WANDB_ID_FILE).read_text().strip()
    assert runs[0].name.endswith(f"-{run_id}")
    cfg = quiet(wandb=True, wandb_project="t")
    resumed, _ = make_logger(tmp_path, cfg=cfg, resume=True, start_step=1)
    assert resumed._wandb._run.id == run_id
    resumed.close()
    fresh, _ = make_logger(tmp_path, cfg=cfg)
    assert fresh._wandb._run.id != run_id
    fresh.close()


def test_wandb_enabled_but_missing_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError) as info:
        make_logger(tmp_path, cfg=quiet(wandb=True))
    assert str(info.value) == (
        "logging.wandb is true but the wandb package is not installed; "
        "run 'pip install wandb' or set logging.wandb=false"
    )


# ----------------------------------------------------------------------------- plot


def test_plot_metrics_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    logger, _ = make_logger(tmp_path, total=20)
    rng = np.random.default_rng(0)
    for step in range(1, 21):
        metrics = {
            "reward/mean": 0.3 + 0.02 * step,
            "reward/std": 0.1,
            "response_len/mean": 20 - 0.3 * step,
            "actor/kl_ref": 1e-3 * step,
            "actor/entropy": 2.0 - 0.05 * step + 0.01 * rng.standard_normal(),
        }
        if step % 10 == 0:
            metrics["eval/reward"] = 0.3 + 0.02 * step
        logger.log(step, metrics)
    logger.close()
    png = plot_metrics(logger.jsonl_path, tmp_path / "plots" / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
    pixels = imread(png)
    assert pixels.shape[:2] == (700, 1000)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50


def test_plot_metrics_with_missing_panels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "reward/mean": 0.1}\n{"step": 2, "reward/mean": null}\n')
    png = plot_metrics(path, tmp_path / "m.png")
    assert png.stat().st_size > 5_000


def test_compile_totals_count_new_shapes_only() -> None:
    """A jitted function compiles once per new shape; a cached call adds nothing."""
    f = jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.0)
    before = jlog.compile_totals()
    f(jnp.ones((7, 5))).block_until_ready()
    first = jlog.compile_totals()
    assert first["count"] >= before["count"] + 1 and first["seconds"] > before["seconds"]
    f(jnp.ones((7, 5))).block_until_ready()  # cached: no compilation
    assert jlog.compile_totals() == first
    f(jnp.ones((9, 5))).block_until_ready()  # a new shape compiles again
    assert jlog.compile_totals()["count"] >= first["count"] + 1
