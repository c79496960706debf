"""Runs that end early lose nothing: stop signals save and resume bit-exactly (through the
launcher on the tiny toy), bad steps stop the run, a non-finite state is never saved, and an
output directory that cannot serve is one sentence."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import ROOT, TINY_MODEL

from jaxrlhf.checkpoint import Checkpointer
from jaxrlhf.cli import main_guard
from jaxrlhf.config import CheckpointConfig, load_config
from jaxrlhf.errors import DivergedError
from jaxrlhf.system.run_guards import BadSteps, StopSignals, nonfinite_leaves
from jaxrlhf.system.run_loop import RunLoop

TOTAL = 16
# The toy at test sizes; the entropy bonus moves the weights every step although the tiny
# policy earns no reward, so equal final weights mean equal training, not an idle run.
TOY_RUN = [
    "--config", str(ROOT / "configs" / "toy_ppo.yaml"), *TINY_MODEL, "data.batch_size=4",
    "data.eval_size=8", "generation.n_samples=2", "generation.max_new_tokens=4",
    "sft_warmup.steps=0", "algorithm.entropy_coef=0.01", f"experiment.total_steps={TOTAL}",
]  # fmt: skip
TIMING = ("wall_s", "time/", "perf/")


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One CPU device and a compilation cache shared by this module's launcher runs (the first
    run compiles, the others load: seconds instead of half a minute each)."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return os.environ | {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def launch(out: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "launchers" / "ppo.py"), *TOY_RUN,
           f"experiment.output_dir={out}", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=out.parent)  # fmt: skip


def rows(out: Path) -> list[dict]:
    """metrics.jsonl's records without the wall-clock metrics."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith(TIMING)} for x in lines]


def checkpoint_steps(out: Path) -> list[int]:
    ckpt = Checkpointer(CheckpointConfig(dir=str(out / "checkpoints")))
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def checkpoint_leaves(out: Path, step: int | None = None) -> list[np.ndarray]:
    ckpt = Checkpointer(CheckpointConfig(dir=str(out / "checkpoints")))
    try:
        return [np.asarray(x) for x in jax.tree.leaves(ckpt.restore(None, step=step).state)]
    finally:
        ckpt.close()


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def signal_at(
    proc: subprocess.Popen, out: Path, sig: signal.Signals, step: int, saved: int | None = None
) -> None:
    """Send ``sig`` once metrics.jsonl has the row of ``step`` (and checkpoint ``saved`` is
    complete: orbax renames its temporary directory when it is)."""
    path = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        done = saved is None or (out / "checkpoints" / str(saved)).is_dir()
        if done and any(json.loads(x)["step"] >= step for x in lines if x.endswith("}")):
            proc.send_signal(sig)
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or hung before step {step}: {finish(proc)}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, launch_env: dict[str, str]):
    """The uninterrupted run: (metrics rows, final checkpoint leaves, its output directory)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    rc, _, stderr = finish(launch(out, launch_env))
    assert rc == 0, stderr
    assert checkpoint_steps(out) == [TOTAL]
    return rows(out), checkpoint_leaves(out), out


def assert_resumed_equals_straight(out: Path, straight) -> None:
    straight_rows, straight_leaves, _ = straight
    resumed = rows(out)
    assert [r["step"] for r in resumed] == list(range(TOTAL + 1))  # every step once (0: eval)
    assert resumed == straight_rows
    leaves = checkpoint_leaves(out, TOTAL)
    assert len(leaves) == len(straight_leaves)
    for a, b in zip(leaves, straight_leaves, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_stops_and_resumes_bitwise(tmp_path, launch_env, straight, sig):
    """The first SIGTERM / SIGINT finishes the step, saves it (checkpoint.save_every is 0),
    exits 128 + N with one line; the rerun resumes and equals the uninterrupted run."""
    out = tmp_path / "run"
    proc = launch(out, launch_env)
    signal_at(proc, out, sig, 2)
    rc, _, stderr = finish(proc)
    assert rc == 128 + sig, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert lines[0] == (
        f"jaxrlhf: {sig.name} received: saving a checkpoint after this step, then stopping "
        "(Ctrl-C again aborts at once without saving)"
    )
    match = re.fullmatch(
        rf"jaxrlhf: stopped by {sig.name} after step (\d+) of {TOTAL}; checkpoint saved in "
        rf"{re.escape(str(out / 'checkpoints'))}; rerun the same command to resume\.",
        lines[1],
    )
    assert match and len(lines) == 2, stderr
    stopped = int(match[1])
    assert 2 <= stopped < TOTAL
    assert checkpoint_steps(out) == [stopped]
    assert [r["step"] for r in rows(out)] == list(range(stopped + 1))

    rc, stdout, stderr = finish(launch(out, launch_env))
    assert rc == 0, stderr
    assert f"resumed from step {stopped}" in stdout
    assert_resumed_equals_straight(out, straight)
    moved = checkpoint_leaves(out, stopped)
    assert not all(np.array_equal(a, b) for a, b in zip(moved, straight[1], strict=True))


def test_rerunning_a_finished_run_keeps_its_history(tmp_path, launch_env, straight):
    """The same command again resumes at the last step, trains nothing and leaves the metrics
    (and the plot drawn from them) as they were."""
    out = tmp_path / "run"
    shutil.copytree(straight[2], out)
    (out / "metrics.png").unlink()
    rc, stdout, stderr = finish(launch(out, launch_env))
    assert rc == 0, stderr
    assert f"resumed from step {TOTAL}" in stdout
    assert rows(out) == straight[0]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigkill_then_resume_keeps_each_step_once(tmp_path, launch_env, straight):
    """A run killed outright (rows logged past its last checkpoint) resumes from that checkpoint;
    the rows it re-runs replace the old ones, and the result equals the uninterrupted run."""
    out = tmp_path / "run"
    proc = launch(out, launch_env, "checkpoint.save_every=3")
    signal_at(proc, out, signal.SIGKILL, 4, saved=3)
    rc, _, _ = finish(proc)
    assert rc == -signal.SIGKILL
    killed_at = max(r["step"] for r in rows(out))
    saved = checkpoint_steps(out)
    assert saved and max(saved) <= killed_at < TOTAL
    rc, stdout, stderr = finish(launch(out, launch_env, "checkpoint.save_every=3"))
    assert rc == 0, stderr
    assert f"resumed from step {max(saved)}" in stdout
    assert_resumed_equals_straight(out, straight)


def test_output_dir_errors_are_one_line(tmp_path, launch_env):
    (tmp_path / "afile").write_text("x")
    cases = {
        "/proc/jaxrlhf_run": "No such file or directory",
        str(tmp_path / "afile" / "run"): f"{str(tmp_path / 'afile')!r} is a file, not a directory",
    }
    for path, why in cases.items():
        proc = launch(tmp_path / "unused", launch_env, f"experiment.output_dir={path}")
        rc, _, stderr = finish(proc)
        assert rc == 2, stderr
        assert stderr.strip().splitlines() == [
            f"config error: experiment.output_dir={path!r} cannot be created or written ({why}); "
            "choose a writable path."
        ]


# ----------------------------------------------------------------------------- signal handling


def test_stop_signals_record_the_first_and_restore_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with StopSignals(announce=False) as signals:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # the handler runs in this (the main) thread at the next bytecode
        assert signals.received == signal.SIGUSR1
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a Ctrl-C now aborts
        os.kill(os.getpid(), signal.SIGTERM)  # a second notice is ignored
        time.sleep(0.05)
        assert signals.received == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in before} == before

    result: list[StopSignals] = []
    thread = threading.Thread(target=lambda: result.append(StopSignals().__enter__()))
    thread.start()
    thread.join()
    assert result[0].received is None  # off the main thread: nothing installed, no error
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_sigint_aborts_at_once():
    script = (
        "import os, signal, time\n"
        "from jaxrlhf.system.run_guards import StopSignals\n"
        "with StopSignals() as s:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    print('stopping', s.received.name, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == -signal.SIGINT  # ended by the signal: the shell shows 130
    assert done.stdout == "stopping SIGINT\n"
    assert done.stderr.splitlines() == [
        "jaxrlhf: SIGINT received: saving a checkpoint after this step, then stopping "
        "(Ctrl-C again aborts at once without saving)"
    ]


def test_main_guard_exit_codes(capsys):
    def diverge():
        raise DivergedError("training diverged: step 3 ...")

    def interrupt():
        raise KeyboardInterrupt

    for fn, code, line in [
        (diverge, 3, "training diverged: step 3 ..."),
        (interrupt, 130, "jaxrlhf: interrupted (SIGINT); stopped without saving (checkpoints "
                         "already written are kept)."),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as info:
            main_guard(fn)()
        assert info.value.code == code
        assert capsys.readouterr().err.splitlines() == [line]


# ----------------------------------------------------------------------------- bad steps


class ScriptedLoop(RunLoop):
    """A stand-in trainer: one float array as its state, and per-step metrics (and state
    changes) given by the test."""

    def __init__(self, cfg, script: dict[int, dict]) -> None:
        super().__init__(cfg)
        self.script = script
        self.w = jnp.zeros(3)
        self.restore()
        self.start_logging()

    def state_tree(self):
        return {"w": self.w}

    def set_state_tree(self, tree):
        self.w = tree["w"]

    def data_state(self):
        return None

    def train_step(self):
        self.step += 1
        step = self.script.get(self.step, {})
        self.w = step.get("w", self.w + 1.0)
        return {"train/loss": jnp.float32(1.0 / self.step)} | step.get("metrics", {})

    def evaluate(self):
        return None

    def export(self):
        return None


def loop_config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"experiment.output_dir={tmp_path}", "logging.progress=false",
                              "checkpoint.save_every=1", "checkpoint.max_to_keep=10",
                              "algorithm.max_bad_steps=3", *overrides])  # fmt: skip


def jsonl_column(tmp_path: Path, key: str) -> list:
    return [json.loads(x).get(key) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_bad_steps_in_a_row_stop_the_run(tmp_path):
    nan = {"metrics": {"train/loss": jnp.float32(jnp.nan)}}
    skipped = {"metrics": {"actor/nonfinite_skipped": 0.5}}
    script = {2: nan, 4: skipped, 5: nan, 6: nan, 7: {}}
    loop = ScriptedLoop(loop_config(tmp_path, "experiment.total_steps=10"), script)
    with loop.logger, pytest.raises(DivergedError) as info:
        loop.run()
    directory = tmp_path / "checkpoints"
    assert str(info.value) == (
        "training diverged: 3 steps in a row with non-finite values (algorithm.max_bad_steps=3), "
        "the first at step 4: actor/nonfinite_skipped = 0.5 (a non-finite loss or gradient; "
        f"update skipped); stopped at step 6 without saving, the latest stays step 5 in "
        f"{directory}."
    )
    assert jsonl_column(tmp_path, "train/bad_steps") == [0, 1, 0, 1, 2, 3]  # flushed, step 6 too
    assert jsonl_column(tmp_path, "train/loss")[1] is None
    assert checkpoint_steps(tmp_path) == [1, 2, 3, 4, 5]
    assert BadSteps.bad_metric({"a": 1.0, "b/nonfinite_skipped": 0.0, "c": float("inf")}) == (
        "c",
        float("inf"),
    )


def test_bad_step_streak_continues_after_a_resume(tmp_path):
    nan = {"metrics": {"train/loss": jnp.float32(jnp.nan)}}
    first = ScriptedLoop(loop_config(tmp_path, "experiment.total_steps=4"), {3: nan, 4: nan})
    with first.logger:
        first.run()  # two bad steps: under the limit, the run ends and saves step 4
    resumed = ScriptedLoop(loop_config(tmp_path, "experiment.total_steps=8"), {5: nan})
    assert resumed.step == 4 and resumed.bad_steps.count == 2
    with resumed.logger, pytest.raises(DivergedError, match="the first at step 3: train/loss"):
        resumed.run()
    assert jsonl_column(tmp_path, "train/bad_steps") == [0, 0, 1, 2, 3]


def test_a_non_finite_state_is_never_saved(tmp_path):
    script = {3: {"w": jnp.array([0.0, jnp.inf, 1.0])}}
    loop = ScriptedLoop(loop_config(tmp_path, "experiment.total_steps=5"), script)
    with loop.logger, pytest.raises(DivergedError) as info:
        loop.run()
    assert str(info.value) == (
        "training diverged: at step 3 the state is not finite (['w'] hold NaN or inf); no "
        f"checkpoint written, the latest stays step 2 in {tmp_path / 'checkpoints'}."
    )
    assert checkpoint_steps(tmp_path) == [1, 2]


def test_nonfinite_leaves_names_float_leaves_only():
    tree = {"a": jnp.ones(2), "b": {"c": jnp.array([1.0, jnp.nan])}, "k": jax.random.key(0),
            "n": jnp.arange(3), "d": jnp.array(-jnp.inf, jnp.bfloat16)}  # fmt: skip
    assert nonfinite_leaves(tree) == ["['b']['c']", "['d']"]
    assert nonfinite_leaves({"n": jnp.arange(3)}) == []
