"""Checkpoints that cannot be restored: a damaged latest step falls back to the newest intact one
(and says so), a config that does not fit the checkpoint is one sentence naming the keys, and a
write that fails (a full disk) is one sentence that leaves the previous step the latest."""

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from toy import ROOT, TINY_MODEL, toy_config

from jaxrlhf.checkpoint import (
    Checkpointer,
    CheckpointIOError,
    HostState,
    abstract_like,
    state_settings,
)
from jaxrlhf.config import CheckpointConfig, Config, ConfigError, config_to_yaml, with_overrides


def state_at(step: int) -> dict:
    """A state whose every leaf says which step wrote it (so a restore names its step)."""
    w = jax.random.normal(jax.random.key(step), (64, 64))  # incompressible: a real data file
    return {"a": {"w": w, "b": jnp.arange(5) + step}, "rng": jax.random.key(step)}


def save_steps(directory: Path, steps, cfg: Config | None = None) -> None:
    host = HostState(config=None if cfg is None else config_to_yaml(cfg))
    with Checkpointer(CheckpointConfig(dir=str(directory), max_to_keep=None)) as ckpt:
        for step in steps:
            ckpt.save(step, state_at(step), host)


def damage(step_dir: Path, how: str) -> None:
    """Damage one saved step the way a crash, a bad disk or a careless user does."""
    if how in ("truncated array", "overwritten array"):
        data = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
        size = data.stat().st_size
        assert size > 64 * 64  # the float array's file, not a small index
        data.write_bytes(data.read_bytes()[: size // 2] if how[0] == "t" else os.urandom(size))
    elif how == "missing _METADATA":
        (step_dir / "state" / "_METADATA").unlink()
    elif how == "corrupt host JSON":
        (step_dir / "host" / "metadata").write_text('{"format": 1, "step"')
    else:
        raise AssertionError(how)


REASONS = {
    "truncated array": r"an array in state/ is unreadable: .*a\.w",
    "overwritten array": r"an array in state/ is unreadable: .*a\.w",
    "missing _METADATA": r"state/_METADATA is missing",
    "corrupt host JSON": r"host/ is unreadable: ",
}


def assert_state_of(restored, step: int, written: int | None = None) -> None:
    """``restored`` is step ``step``, holding ``state_at(written)`` (default: of that step)."""
    want = state_at(step if written is None else written)
    assert restored.step == step
    np.testing.assert_array_equal(restored.state["a"]["w"], want["a"]["w"])
    np.testing.assert_array_equal(restored.state["a"]["b"], np.asarray(want["a"]["b"]))
    key_data = jax.random.key_data
    np.testing.assert_array_equal(key_data(restored.state["rng"]), key_data(want["rng"]))


@pytest.mark.parametrize("how", sorted(REASONS))
def test_damaged_latest_step_falls_back_and_says_so(tmp_path, how):
    save_steps(tmp_path, [1, 2, 3])
    damage(tmp_path / "3", how)
    lines: list[str] = []
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        got = ckpt.restore(abstract_like(state_at(0)), report=lines.append)
        assert_state_of(got, 2)
        assert len(lines) == 1 and "\n" not in lines[0]
        assert lines[0].startswith(f"checkpoint step 3 in {tmp_path} is damaged (")
        assert re.search(REASONS[how], lines[0]), lines[0]
        # Kept for inspection, out of the way: the run saves step 3 again and it is the latest.
        assert lines[0].endswith(f"skipped, and moved to {tmp_path / 'damaged' / '3'}")
        assert (tmp_path / "damaged" / "3" / "state").is_dir()
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.save(3, state_at(33))
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        assert ckpt.latest_step() == 3 and ckpt.all_steps() == [1, 2, 3]
        assert_state_of(ckpt.restore(abstract_like(state_at(0)), report=pytest.fail), 3, 33)


def test_no_intact_step_is_one_sentence_and_moves_nothing(tmp_path):
    save_steps(tmp_path, [1, 2, 3])
    damage(tmp_path / "3", "truncated array")
    damage(tmp_path / "2", "missing _METADATA")
    damage(tmp_path / "1", "corrupt host JSON")
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        with pytest.raises(CheckpointIOError) as err:
            ckpt.restore(abstract_like(state_at(0)), report=pytest.fail)
        assert ckpt.all_steps() == [1, 2, 3]
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"checkpoint step 3 in {tmp_path} is damaged: an array in state/")
    assert message.endswith(
        "(so are steps 1, 2); repair or remove it, or set checkpoint.resume=false."
    )
    assert not (tmp_path / "damaged").exists()


def test_explicit_step_that_is_damaged_is_not_replaced(tmp_path):
    save_steps(tmp_path, [1, 2])
    damage(tmp_path / "1", "corrupt host JSON")
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        with pytest.raises(CheckpointIOError, match=r"checkpoint step 1 .* host/ is unreadable"):
            ckpt.restore(step=1)
        assert_state_of(ckpt.restore(abstract_like(state_at(0)), step=2), 2)


# ----------------------------------------------------------------------------- config vs checkpoint

BASE = Config()


def test_model_change_is_one_sentence_listing_the_keys(tmp_path):
    save_steps(tmp_path, [1], BASE)
    other = with_overrides(BASE, ["actor.hidden_size=128", "actor.num_layers=4"])
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        with pytest.raises(ConfigError) as err:
            ckpt.restore(abstract_like(state_at(0)), config=other, report=pytest.fail)
        assert ckpt.all_steps() == [1]  # an intact step that does not fit is not "damaged"
    assert str(err.value) == (
        f"checkpoint step 1 in {tmp_path} was saved with actor.hidden_size=64, "
        "actor.num_layers=2; this config has 128, 4: resume with the same model or set "
        "checkpoint.resume=false."
    )


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["algorithm.advantage_estimator=grpo"], "critic.enabled=true; this config has false"),
        (["critic.path=/models/c"], "critic.path=null; this config has /models/c"),
        (["algorithm.kl_coef=0.1"], "ref.enabled=false; this config has true"),
        (["actor.path=/models/x"], "actor.path=null; this config has /models/x"),
        (
            ["actor.model_type=qwen3", "actor.tie_word_embeddings=false"],
            "actor.model_type=qwen2, actor.tie_word_embeddings=true; this config has qwen3, false",
        ),
    ],
)
def test_state_settings_that_differ(tmp_path, overrides, keys):
    assert BASE.use_critic and not BASE.use_ref  # the defaults these cases flip
    save_steps(tmp_path, [1], BASE)
    other = with_overrides(BASE, overrides)
    pattern = "was saved with " + keys.replace(".", r"\.")
    with (
        Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt,
        pytest.raises(ConfigError, match=pattern),
    ):
        ckpt.restore(config=other)


def test_a_config_from_an_older_schema_is_compared_on_the_keys_both_have(tmp_path):
    saved = config_to_yaml(BASE) + "retired_group:\n  knob: 1\n"  # no longer a config key
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        ckpt.save(1, state_at(1), HostState(config=saved))
        other = with_overrides(BASE, ["actor.vocab_size=100"])
        with pytest.raises(
            ConfigError, match=r"saved with actor\.vocab_size=512; this config has 100:"
        ):
            ckpt.restore(config=other, report=pytest.fail)
        lines: list[str] = []
        assert ckpt.restore(config=BASE, report=lines.append).step == 1
    assert lines == [
        f"checkpoint step 1 in {tmp_path} was saved with other values of retired_group.knob; "
        "this run uses its own"
    ]


def test_other_changes_are_one_note_and_restore(tmp_path):
    save_steps(tmp_path, [1], BASE)
    other = with_overrides(
        BASE, ["actor.optimizer.lr=3e-4", "experiment.total_steps=99", "mesh.fsdp=2"]
    )
    assert state_settings(other) == state_settings(BASE)
    lines: list[str] = []
    with Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt:
        assert_state_of(
            ckpt.restore(abstract_like(state_at(0)), config=other, report=lines.append), 1
        )
    assert lines == [
        f"checkpoint step 1 in {tmp_path} was saved with other values of actor.optimizer.lr, "
        "experiment.total_steps, mesh.fsdp; this run uses its own"
    ]


def test_arrays_that_do_not_fit_the_target_are_a_config_error(tmp_path):
    save_steps(tmp_path, [1], BASE)
    target = abstract_like(state_at(0))
    target["a"]["w"] = jax.ShapeDtypeStruct(
        (64, 32), jnp.float32, sharding=target["a"]["w"].sharding
    )
    target["critic"] = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=target["a"]["w"].sharding)
    del target["a"]["b"]
    other = with_overrides(BASE, ["actor.optimizer.grad_clip=null"])
    with (
        Checkpointer(CheckpointConfig(dir=str(tmp_path))) as ckpt,
        pytest.raises(ConfigError) as err,
    ):
        ckpt.restore(target, config=other, report=pytest.fail)
    assert str(err.value) == (
        f"checkpoint step 1 in {tmp_path} holds arrays this run does not build (a.b: only in the "
        "checkpoint; critic: not in the checkpoint; a.w: saved [64, 64], here [64, 32]); "
        "settings that differ: actor.optimizer.grad_clip: resume with the same settings or set "
        "checkpoint.resume=false."
    )


# ----------------------------------------------------------------------------- a full disk


def assert_previous_step_survives(directory: Path, err: CheckpointIOError) -> None:
    assert str(err) == (
        f"could not write checkpoint step 2 to {directory}: No space left on device; "
        "step 1 remains the latest."
    )
    assert any(p.name.startswith("2.") for p in directory.iterdir())  # the partial write
    with Checkpointer(CheckpointConfig(dir=str(directory))) as ckpt:  # a new start
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        assert_state_of(ckpt.restore(abstract_like(state_at(0))), 1)
        assert ckpt.save(2, state_at(2))  # the step is free again
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # the partial one removed


def test_disk_full_during_async_save_is_one_sentence(tmp_path, monkeypatch, capfd):
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=True))
    ckpt.save(1, state_at(1))
    ckpt.wait()

    async def full_disk(self):  # the commit, in orbax's save thread, once every item is written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
    assert ckpt.save(2, state_at(2))  # returns before the write: the error comes later
    with pytest.raises(CheckpointIOError) as err:
        ckpt.save(3, state_at(3))
    assert ckpt.latest_step() == 1
    ckpt.close()
    monkeypatch.undo()
    assert_previous_step_survives(tmp_path, err.value)
    assert "Traceback" not in capfd.readouterr().err  # orbax's thread logs nothing


def test_disk_full_on_a_real_small_filesystem(tmp_path, capfd):
    mount = tmp_path / "small"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a 3 MB tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip(
            "this machine does not allow mounting a tmpfs (a container without CAP_SYS_ADMIN)"
        )
    try:
        directory = mount / "ckpt"
        with (
            pytest.raises(CheckpointIOError) as err,
            Checkpointer(CheckpointConfig(dir=str(directory))) as ckpt,
        ):
            ckpt.save(1, state_at(1))
            big = jax.random.normal(jax.random.key(0), (1024, 1024))  # 4 MB, incompressible
            ckpt.save(2, {"a": {"w": big}})
        assert_previous_step_survives(directory, err.value)
        assert "Traceback" not in capfd.readouterr().err
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ----------------------------------------------------------------------------- the toy run

TOY = [
    "data.batch_size=4", "data.eval_size=4", "generation.n_samples=2",
    "generation.max_new_tokens=4", "experiment.total_steps=2", "sft_warmup.steps=0",
    "algorithm.advantage_estimator=grpo", "critic.enabled=false", "checkpoint.save_every=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A finished two-step toy run that checkpointed both steps."""
    from jaxrlhf.system.coordinator import PPOCoordinator

    out = tmp_path_factory.mktemp("toy")
    coordinator = PPOCoordinator(toy_config(out, *TOY))
    with coordinator.logger:
        coordinator.run()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]
    return out


def test_toy_run_with_a_damaged_latest_checkpoint_resumes_from_the_previous(
    toy_run, tmp_path, capsys
):
    from jaxrlhf.system.coordinator import PPOCoordinator

    shutil.copytree(toy_run / "checkpoints", tmp_path / "checkpoints")
    ckpt_dir = (tmp_path / "checkpoints").absolute()
    damage(ckpt_dir / "2", "truncated array")
    cfg = toy_config(tmp_path, *TOY)
    capsys.readouterr()
    resumed = PPOCoordinator(cfg)
    out = capsys.readouterr().out.splitlines()
    skipped = [line for line in out if "is damaged" in line]
    assert len(skipped) == 1
    assert skipped[0].startswith(f"checkpoint step 2 in {ckpt_dir} is damaged (an array in state/")
    assert f"resumed from step 1 in {ckpt_dir}" in out
    assert resumed.step == 1
    # The actor is bit-equal to step 1 as read straight from the toy run's own checkpoint.
    with Checkpointer(CheckpointConfig(dir=str(toy_run / "checkpoints"))) as ckpt:
        want = ckpt.restore(abstract_like(resumed.state_tree()), step=1).state["actor"]
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(want), jax.device_get(resumed.models.actor)
    )
    with resumed.logger:
        resumed.run()
    assert resumed.step == 2 and resumed.checkpointer.all_steps() == [1, 2]


def run_launcher(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "ppo.py"), "--config",
         str(ROOT / "configs" / "toy_ppo.yaml"), *TINY_MODEL, *TOY,
         f"experiment.output_dir={out}", *overrides],
        capture_output=True, text=True, cwd=out, timeout=600,
    )  # fmt: skip


def test_launcher_resume_with_another_model_size_is_one_line(toy_run, tmp_path):
    shutil.copytree(toy_run / "checkpoints", tmp_path / "checkpoints")
    done = run_launcher(tmp_path, "actor.hidden_size=48")
    assert done.returncode == 2, done.stderr
    ckpt_dir = (tmp_path / "checkpoints").absolute()
    assert done.stderr.strip().splitlines() == [
        f"config error: checkpoint step 2 in {ckpt_dir} was saved with actor.hidden_size=32; "
        "this config has 48: resume with the same model or set checkpoint.resume=false."
    ]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2"]  # nothing moved or lost


def test_launcher_with_no_intact_checkpoint_is_one_line(toy_run, tmp_path):
    shutil.copytree(toy_run / "checkpoints", tmp_path / "checkpoints")
    ckpt_dir = (tmp_path / "checkpoints").absolute()
    damage(ckpt_dir / "2", "missing _METADATA")
    damage(ckpt_dir / "1", "corrupt host JSON")
    done = run_launcher(tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"data error: checkpoint step 2 in {ckpt_dir} is damaged: state/_METADATA is missing "
        "(so is step 1); repair or remove it, or set checkpoint.resume=false."
    ]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2"]


def test_launcher_resumes_past_a_damaged_step_quietly(toy_run, tmp_path):
    shutil.copytree(toy_run / "checkpoints", tmp_path / "checkpoints")
    ckpt_dir = (tmp_path / "checkpoints").absolute()
    damage(ckpt_dir / "2", "overwritten array")
    done = run_launcher(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no traceback, no "Exception ignored" from abandoned reads
    lines = done.stdout.splitlines()
    skipped = [line for line in lines if "is damaged" in line]
    assert len(skipped) == 1
    assert skipped[0].startswith(
        f"checkpoint step 2 in {ckpt_dir} is damaged (an array in state/ is unreadable: "
    )
    assert skipped[0].endswith(f"): skipped, and moved to {ckpt_dir / 'damaged' / '2'}")
    assert f"resumed from step 1 in {ckpt_dir}" in lines
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2", "damaged"]
