"""Synchronous PPO / GRPO end to end on the built-in toy task (tiny shapes, a few steps)."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from toy import ROOT, toy_config

from jaxrlhf.config import load_config
from jaxrlhf.system.coordinator import PPOCoordinator

TINY = [
    "data.batch_size=4", "data.eval_size=8", "generation.n_samples=2",
    "generation.max_new_tokens=4", "experiment.total_steps=2", "sft_warmup.steps=2",
    "sft_warmup.batch_size=4",
]  # fmt: skip
GRPO = ["algorithm.advantage_estimator=grpo", "critic.enabled=false"]
PPO_CRITIC = ["algorithm.advantage_estimator=gae", "critic.enabled=true", "algorithm.ppo_epochs=2"]


def _config(tmp_path, *extra):
    return toy_config(tmp_path, *TINY, *extra)


def _finite(record):
    return all(math.isfinite(v) for v in record.values() if isinstance(v, float))


@pytest.mark.parametrize("variant", ["ppo_critic", "grpo"])
def test_few_steps_run_and_write_outputs(tmp_path, variant):
    extra = GRPO if variant == "grpo" else PPO_CRITIC
    cfg = _config(tmp_path, *extra)
    coordinator = PPOCoordinator(cfg)
    assert (coordinator.models.critic is not None) == (variant == "ppo_critic")
    with coordinator.logger:
        summary = coordinator.run()
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] >= 1]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert _finite(r)
        for key in ("reward/mean", "actor/grad_norm", "actor/entropy", "actor/logprob_gap",
                    "response_len/mean", "time/actor_gen", "perf/tokens_per_s"):  # fmt: skip
            assert key in r, key
        if variant == "ppo_critic":
            assert "critic/value_loss" in r or "critic/loss" in r
    assert "eval/reward" in steps[-1]
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "2").is_dir()


def test_step_zero_logprob_gap_and_unit_ratio(tmp_path):
    """The trainer's log-probs equal the sampler's (< 1e-5); with one update per batch the
    first PPO ratio is exactly 1 (π_old is the current policy), so nothing is clipped."""
    cfg = _config(tmp_path / "a", *GRPO, "experiment.total_steps=1", "algorithm.ppo_epochs=1",
                  "algorithm.n_minibatches=1")  # fmt: skip
    metrics = PPOCoordinator(cfg).train_step()
    assert metrics["actor/logprob_gap_max"] < 1e-5
    assert metrics["actor/ratio_min"] == metrics["actor/ratio_max"] == 1.0
    assert metrics["actor/clip_frac"] == 0.0 and metrics["actor/approx_kl"] == 0.0
    # Several updates per batch: π_old is recomputed by the trainer before the first one.
    cfg = _config(tmp_path / "b", *GRPO, "experiment.total_steps=1", "algorithm.ppo_epochs=2")
    metrics = PPOCoordinator(cfg).train_step()
    assert 0.0 <= metrics["actor/logprob_gap_max"] < 1e-5


@pytest.mark.parametrize("variant", ["grpo", "ppo_critic"])
def test_resume_equals_straight_run(tmp_path, variant):
    """3 steps straight == 2 steps, a new coordinator resuming from the checkpoint, 1 step:
    bitwise-equal actor (and critic) params and optimizer state, and equal metrics."""
    extra = [*(GRPO if variant == "grpo" else PPO_CRITIC), "experiment.total_steps=3"]
    straight = PPOCoordinator(_config(tmp_path / "a", *extra))
    with straight.logger:
        straight.run()
    first = PPOCoordinator(_config(tmp_path / "b", *extra))
    with first.logger:
        for _ in range(2):
            metrics = first.train_step()
            first.history.append(
                {k: v for k, v in metrics.items() if not k.startswith(("time/", "perf/"))}
            )
        first.save()
        first.checkpointer.close()
    resumed = PPOCoordinator(_config(tmp_path / "b", *extra))
    assert resumed.step == 2 and resumed.version == 2
    with resumed.logger:
        resumed.run()
    for role in ("actor", "critic"):
        a, b = getattr(straight.models, role), getattr(resumed.models, role)
        assert (a is None) == (b is None) == (role == "critic" and variant == "grpo")
        if a is not None:
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
    last = lambda c: {k: v for k, v in c.history[-1].items() if not k.startswith("eval/")}
    assert last(straight) == last(resumed)


def test_launcher_errors_and_graph(tmp_path):
    run = lambda *args: subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "ppo.py"), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    bad = run("--config", str(ROOT / "configs" / "toy_ppo.yaml"), "actor.optimizer.lrr=1e-6")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "config error: unknown config key 'actor.optimizer.lrr'; did you mean 'actor.optimizer.lr'?"
    ]
    (tmp_path / "p.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n')
    no_key = run("--config", str(ROOT / "configs" / "toy_ppo.yaml"), "data.train_path=p.jsonl")
    assert no_key.returncode == 2, no_key.stderr
    lines = no_key.stderr.strip().splitlines()  # the skipped-row warnings, then one error line
    assert lines[-1] == "data error: p.jsonl: no usable prompts (1 rows read)."
    assert "missing key 'prompt'" in no_key.stderr and "Traceback" not in no_key.stderr
    graph = run("--config", str(ROOT / "configs" / "toy_ppo.yaml"), *PPO_CRITIC, "--print-graph")
    assert graph.returncode == 0, graph.stderr
    assert "actor_gen" in graph.stdout and "critic_train" in graph.stdout


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_build_graphs(name):
    from jaxrlhf.dfg import build_graph

    cfg = load_config(ROOT / "configs" / name)
    graph = build_graph(cfg)
    assert ("critic_train" in graph.order) == cfg.use_critic


def test_loaded_model_too_short_for_prompt_and_response_is_a_config_error(tmp_path):
    """A model from actor.path is checked against data.max_prompt_len + max_new_tokens before
    anything compiles (a from-scratch one is checked by the config)."""
    from jaxrlhf.config import ConfigError
    from jaxrlhf.data.tokenizer import build_char_tokenizer
    from jaxrlhf.models import TransformerConfig, init_model, save_pretrained

    short = TransformerConfig(
        model_type="llama", vocab_size=80, hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, num_kv_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    model_dir = tmp_path / "short_model"
    save_pretrained(init_model(short, seed=0), str(model_dir))
    build_char_tokenizer().save_pretrained(str(model_dir))
    cfg = _config(tmp_path / "run", f"actor.path={model_dir}", "data.max_prompt_len=16")
    with pytest.raises(ConfigError) as e:
        PPOCoordinator(cfg)
    assert str(e.value) == (
        "data.max_prompt_len + generation.max_new_tokens (20) must be <= the actor's "
        "max_position_embeddings (16)."
    )


def test_missing_critic_path_fails_before_the_sft_warm_start(tmp_path, monkeypatch):
    from jaxrlhf.config import ConfigError

    def warm_start(self, actor):
        raise AssertionError("the SFT warm start ran before the critic path was checked")

    monkeypatch.setattr(PPOCoordinator, "_sft_warmup", warm_start)
    cfg = _config(tmp_path, *PPO_CRITIC, f"critic.path={tmp_path / 'no_such_critic'}")
    with pytest.raises(ConfigError, match=r"^critic\.path: .*no_such_critic does not exist"):
        PPOCoordinator(cfg)
