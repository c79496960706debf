"""The typed config: defaults, YAML round trip, dotted overrides and one-sentence errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from jaxrlhf.cli import main_guard, parse_cli
from jaxrlhf.config import (
    Config,
    ConfigError,
    MeshConfig,
    OptimizerConfig,
    RopeScalingConfig,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
    save_config,
    validate,
    with_overrides,
)
from jaxrlhf.registry import Registry

TOY = Path(__file__).resolve().parents[1] / "configs" / "toy_ppo.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- defaults


def test_defaults_are_valid_and_resolved() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.experiment.output_dir == f"runs/{cfg.experiment.name}"
    assert cfg.checkpoint.dir == f"{cfg.experiment.output_dir}/checkpoints"
    assert cfg.actor.path is None and cfg.actor.model_type == "qwen2"
    assert cfg.actor.optimizer == OptimizerConfig()
    assert cfg.actor.optimizer.betas == (0.9, 0.999)
    assert cfg.use_critic and not cfg.use_ref  # gae needs values; kl_coef is 0
    hash(cfg)  # frozen and hashable: a jitted function may close over it


def test_mesh_axes_are_data_fsdp_tensor() -> None:
    assert [f.name for f in dataclasses.fields(MeshConfig)] == ["data", "fsdp", "tensor"]
    assert MeshConfig() == MeshConfig(data=-1, fsdp=1, tensor=1)


def test_toy_config_is_tiny_and_loads() -> None:
    cfg = load_config(TOY)
    assert cfg.actor.path is None and cfg.actor.num_layers <= 4 and cfg.actor.hidden_size <= 128
    assert cfg.actor.vocab_size >= 78  # the built-in character tokenizer
    assert cfg.sft_warmup.steps > 0 and cfg.data.train_path is None


def test_derived_switches() -> None:
    cfg = load_config(None, ["algorithm.advantage_estimator=grpo", "algorithm.kl_coef=0.1"])
    assert not cfg.use_critic and cfg.use_ref
    cfg = with_overrides(cfg, ["critic.enabled=true", "ref.enabled=false", "algorithm.kl_coef=0"])
    assert cfg.use_critic and not cfg.use_ref


# ----------------------------------------------------------------------------- round trip


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        TOY,
        [
            "actor.rope_scaling={rope_type: llama3, factor: 8}",
            "actor.head_dim=32",
            "actor.optimizer.lr=3e-7",
            "generation.stop_token_ids=[1, 2]",
            "generation.top_k=20",
        ],
    )
    text = config_to_yaml(cfg)
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg
    assert config_to_yaml(again) == text
    assert "betas: [0.9, 0.999]" in text  # lists stay readable

    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_to_dict_is_plain() -> None:
    d = config_to_dict(load_config(None, ["generation.stop_token_ids=[7]"]))
    assert d["generation"]["stop_token_ids"] == [7]
    assert d["actor"]["optimizer"]["betas"] == [0.9, 0.999]
    assert yaml.safe_load(yaml.safe_dump(d)) == d


# ----------------------------------------------------------------------------- overrides


def test_overrides_nested_lists_and_null() -> None:
    cfg = load_config(
        TOY,
        [
            "actor.optimizer.lr=1e-6",
            "generation.max_new_tokens=24",
            "actor.optimizer.betas=[0.8, 0.95]",
            "checkpoint.max_to_keep=null",
            "actor.rope_scaling.factor=4",  # fills an Optional group from its defaults
            "experiment.name=2024",  # a string field keeps the text as written
            "mesh={fsdp: 2}",  # a mapping merges into the group
        ],
    )
    assert cfg.actor.optimizer.lr == 1e-6 and isinstance(cfg.actor.optimizer.lr, float)
    assert cfg.generation.max_new_tokens == 24
    assert cfg.actor.optimizer.betas == (0.8, 0.95)
    assert cfg.checkpoint.max_to_keep is None
    assert cfg.actor.rope_scaling == RopeScalingConfig(factor=4.0)
    assert cfg.experiment.name == "2024" and cfg.experiment.output_dir == "runs/2024"
    assert cfg.mesh == MeshConfig(data=-1, fsdp=2, tensor=1)
    assert load_config(None, "generation.top_k=5 generation.top_k=null").generation.top_k is None


def test_yaml_number_forms(tmp_path: Path) -> None:
    # PyYAML reads 1e-6 (no dot) as a string; float fields accept it, and ints too.
    path = write(tmp_path, "actor:\n  rope_theta: 10000\n  optimizer: {lr: 1e-6, eps: 1E-8}\n")
    cfg = load_config(path)
    assert cfg.actor.optimizer.lr == 1e-6 and cfg.actor.optimizer.eps == 1e-8
    assert isinstance(cfg.actor.rope_theta, float)


def test_validate_python_built_config() -> None:
    good = dataclasses.replace(Config(), mesh=MeshConfig(fsdp=2))
    assert validate(good) == good
    bad = dataclasses.replace(Config(), mesh=MeshConfig(fsdp=0))
    assert error_of(validate, bad) == "config key 'mesh.fsdp' must be >= 1, got 0"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "actor.optimizer.lrr=1e-6",
            "unknown config key 'actor.optimizer.lrr'; did you mean 'actor.optimizer.lr'?",
        ),
        ("actor.lr=1e-6", "unknown config key 'actor.lr'; did you mean 'actor.optimizer.lr'?"),
        (
            "generaton.max_new_tokens=8",
            "unknown config key 'generaton.max_new_tokens'; did you mean "
            "'generation.max_new_tokens'?",
        ),
        (
            "generation.max_new_tokens=abc",
            "config key 'generation.max_new_tokens' expects an integer, got 'abc' (str)",
        ),
        (
            "generation.max_new_tokens=true",
            "config key 'generation.max_new_tokens' expects an integer, got true (bool)",
        ),
        (
            "actor.remat=1",
            "config key 'actor.remat' expects a boolean (true or false), got 1 (int)",
        ),
        (
            "checkpoint.max_to_keep=many",
            "config key 'checkpoint.max_to_keep' expects an integer or null, got 'many' (str)",
        ),
        (
            "actor.optimizer.betas=[0.9]",
            "config key 'actor.optimizer.betas' expects a list of 2 values, got [0.9] (list)",
        ),
        ("actor=3", "config key 'actor' is a group of settings and expects a mapping, got 3 (int)"),
        ("actor.optimizer.lr=-1", "config key 'actor.optimizer.lr' must be > 0, got -1"),
        ("generation.top_p=1.5", "config key 'generation.top_p' must be > 0 and <= 1, got 1.5"),
        (
            "actor.optimizer.betas=[0.9, 1.0]",
            "config key 'actor.optimizer.betas[1]' must be >= 0 and < 1, got 1.0",
        ),
        ("mesh.data=0", "config key 'mesh.data' must be >= 1 or -1, got 0"),
        (
            "algorithm.advantage_estimator=grp",
            "algorithm.advantage_estimator='grp' is not a known advantage estimator (known: "
            "dr_grpo, gae, grpo, reinforce_pp, rloo); did you mean 'grpo'?",
        ),
        (
            "actor.param_dtype=fp16",
            "config key 'actor.param_dtype' must be one of 'float32', 'bfloat16', got 'fp16'",
        ),
        (
            "actor.optimizer.lr",
            "override 'actor.optimizer.lr' must have the form key=value, "
            "e.g. 'actor.optimizer.lr=1e-6'",
        ),
        (
            "actor.optimizer.lr.x=1",
            "config key 'actor.optimizer.lr' is a single value, not a group, so override key "
            "'actor.optimizer.lr.x' does not exist",
        ),
    ],
)
def test_bad_override_message(override: str, message: str) -> None:
    assert error_of(load_config, None, [override]) == message


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    message = error_of(load_config, None, ["mesh.zzz=1"])
    assert (
        message == "unknown config key 'mesh.zzz'; valid keys under 'mesh' are data, fsdp, tensor"
    )


def test_bad_override_value_yaml() -> None:
    message = error_of(load_config, None, ["generation.stop_token_ids=[1, 2"])
    assert message.startswith("override 'generation.stop_token_ids=[1, 2' has a value that is not")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm.eps_clip_high=0.1"],
            "algorithm.eps_clip_high (0.1) must be >= algorithm.eps_clip (0.2)",
        ),
        (
            ["critic.enabled=false"],
            "algorithm.advantage_estimator 'gae' needs a critic, but critic.enabled is false",
        ),
        (
            ["algorithm.advantage_estimator=grpo", "generation.n_samples=1"],
            "algorithm.advantage_estimator 'grpo' compares responses within a group, so "
            "generation.n_samples must be >= 2, got 1",
        ),
        (
            ["actor.num_kv_heads=3"],
            "actor.num_heads (4) must be divisible by actor.num_kv_heads (3)",
        ),
        (
            ["experiment.mode=async"],
            "experiment.mode 'async' trains on batches generated by older policies, so "
            "algorithm.decoupled_loss must be true (without it their ratio is 1 and nothing "
            "bounds the update)",
        ),
        (
            ["algorithm.policy_loss=gspo", "algorithm.loss_agg=token_mean"],
            "algorithm.loss_agg 'token_mean' contradicts algorithm.policy_loss 'gspo', which "
            "allows only seq_mean_token_mean; drop algorithm.loss_agg to use its default",
        ),
    ],
)
def test_cross_field_rules(overrides: list[str], message: str) -> None:
    assert error_of(load_config, None, overrides) == message


def test_async_with_the_decoupled_loss_and_gspo_alone_are_valid() -> None:
    cfg = load_config(None, ["experiment.mode=async", "algorithm.decoupled_loss=true"])
    assert cfg.experiment.mode == "async" and cfg.algorithm.decoupled_loss
    cfg = load_config(None, ["algorithm.policy_loss=gspo"])
    assert cfg.algorithm.loss_agg is None  # resolved to GSPO's own aggregation downstream
    cfg = load_config(
        None, ["algorithm.policy_loss=gspo", "algorithm.loss_agg=seq_mean_token_mean"]
    )
    assert cfg.algorithm.loss_agg == "seq_mean_token_mean"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "algorithm.policy_loss=gpso",
            "algorithm.policy_loss='gpso' is not a known policy loss (known: gspo, ppo); "
            "did you mean 'gspo'?",
        ),
        (
            "algorithm.kl_estimator=k4",
            "algorithm.kl_estimator='k4' is not a known KL estimator (known: k1, k2, k3)",
        ),
        (
            "algorithm.loss_agg=token_sum",
            "algorithm.loss_agg='token_sum' is not a known loss aggregation (known: "
            "seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm, token_mean); "
            "did you mean 'token_mean'?",
        ),
    ],
)
def test_registry_names_are_checked_against_the_registry(override: str, message: str) -> None:
    assert error_of(load_config, None, [override]) == message


def test_a_registered_estimator_is_a_valid_name_and_its_metadata_drives_the_rules() -> None:
    from jaxrlhf.algorithms.registries import ADVANTAGE_ESTIMATORS, register_advantage_estimator

    register_advantage_estimator("test_pairwise", lambda *a, **k: None, label="PAIR",
                                 needs_values=True, group=True)  # fmt: skip
    try:
        cfg = load_config(None, ["algorithm.advantage_estimator=test_pairwise"])
        assert cfg.use_critic  # needs_values, not a hard-coded "gae"
        assert error_of(
            load_config,
            None,
            ["algorithm.advantage_estimator=test_pairwise", "critic.enabled=false"],
        ) == (
            "algorithm.advantage_estimator 'test_pairwise' needs a critic, but critic.enabled is "
            "false"
        )
        assert error_of(
            load_config,
            None,
            ["algorithm.advantage_estimator=test_pairwise", "generation.n_samples=1"],
        ) == (
            "algorithm.advantage_estimator 'test_pairwise' compares responses within a group, so "
            "generation.n_samples must be >= 2, got 1"
        )
    finally:
        ADVANTAGE_ESTIMATORS.unregister("test_pairwise")
    assert error_of(load_config, None, ["algorithm.advantage_estimator=test_pairwise"]).startswith(
        "algorithm.advantage_estimator='test_pairwise' is not a known advantage estimator"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "actor:\n  optimizer:\n    lr: .inf\n",
            "config key 'actor.optimizer.lr' must be a finite number, got inf",
        ),
        (
            "algorithm:\n  kl_coef: .nan\n",
            "config key 'algorithm.kl_coef' must be a finite number, got nan",
        ),
        ("reward:\n  clip: -.inf\n", "config key 'reward.clip' must be a finite number, got -inf"),
        (
            "reward:\n  scale: 'inf'\n",
            "config key 'reward.scale' must be a finite number, got 'inf'",
        ),
    ],
)
def test_non_finite_numbers_are_refused_in_files(tmp_path: Path, text: str, message: str) -> None:
    assert error_of(load_config, write(tmp_path, text)) == message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("actor.optimizer.lr=.inf",
         "config key 'actor.optimizer.lr' must be a finite number, got inf"),
        ("distributed.heartbeat_timeout_s=.inf",
         "config key 'distributed.heartbeat_timeout_s' must be a finite number, got inf"),
        ("actor.optimizer.betas=[0.9, .nan]",
         "config key 'actor.optimizer.betas[1]' must be a finite number, got nan"),
    ],
)  # fmt: skip
def test_non_finite_numbers_are_refused_in_overrides(override: str, message: str) -> None:
    assert error_of(load_config, None, [override]) == message


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "actor:\n  optimizer:\n    lrr: 1.0e-6\n")
    message = error_of(load_config, path)
    assert message == "unknown config key 'actor.optimizer.lrr'; did you mean 'actor.optimizer.lr'?"


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "actor:\n  hidden_size: 64\n  num_layers: [2\nmesh:\n  data: 1\n")
    message = error_of(load_config, path)
    assert message.startswith(f"config file '{path}' is not valid YAML at line ")
    assert re.search(r"at line [345], column \d+: ", message)


def test_duplicate_key_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "actor:\n  hidden_size: 64\n  hidden_size: 32\n")
    message = error_of(load_config, path)
    assert message == (
        f"config file '{path}' is not valid YAML at line 3, column 3: "
        "key 'hidden_size' appears twice"
    )


def test_missing_or_non_mapping_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert error_of(load_config, missing) == f"config file '{missing}' does not exist"
    path = write(tmp_path, "- 1\n- 2\n")
    assert error_of(load_config, path) == (
        f"config file '{path}' must hold a mapping of config groups (experiment, actor, ...), "
        "got list"
    )
    assert load_config(write(tmp_path, "# nothing but a comment\n")) == Config()


# ----------------------------------------------------------------------------- launcher helpers


def test_parse_cli() -> None:
    cfg = parse_cli(["--config", str(TOY), "generation.n_samples=2", "mesh.fsdp=2"])
    assert cfg.generation.n_samples == 2 and cfg.mesh.fsdp == 2
    assert parse_cli([f"--config={TOY}"]) == load_config(TOY)
    assert parse_cli([], default_config=str(TOY)) == load_config(TOY)
    assert error_of(parse_cli, ["--lr=1"]) == (
        "unknown option '--lr=1'; expected --config FILE and key=value pairs"
    )
    assert error_of(parse_cli, ["--config"]) == "option --config needs a file name after it"


def test_main_guard_turns_config_error_into_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    @main_guard
    def main(argv: list[str]) -> int:
        parse_cli(argv)
        return 0

    assert main([]) == 0
    with pytest.raises(SystemExit) as info:
        main(["actor.optimizer.lrr=1e-6"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "config error: unknown config key 'actor.optimizer.lrr'; "
        "did you mean 'actor.optimizer.lr'?\n"
    )
    assert "Traceback" not in err


def test_main_guard_reports_unknown_registry_name(capsys: pytest.CaptureFixture[str]) -> None:
    estimators = Registry("advantage estimator")
    estimators.register("gae", object())

    @main_guard
    def main() -> None:
        estimators.get(
            load_config(None, ["algorithm.advantage_estimator=rloo"]).algorithm.advantage_estimator
        )

    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "config error: unknown advantage estimator 'rloo' (known: gae)\n"
    )
