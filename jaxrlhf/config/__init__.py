"""Typed experiment configuration: the schema (`schema`), value checking (`validation`) and
YAML files with dotted command-line overrides (`loading`)::

    cfg = load_config("configs/toy_ppo.yaml", ["actor.optimizer.lr=1e-6", "mesh.fsdp=2"])
    cfg.actor.optimizer.lr          # 1e-06

Every bad input raises `ConfigError` with one sentence that names the key, the value and what was
expected. The command line (``parse_cli``, ``--help-config``, ``main_guard``) is `jaxrlhf.cli`.
"""

from jaxrlhf.config.loading import config_to_yaml, load_config, save_config, with_overrides
from jaxrlhf.config.schema import (
    AlgorithmConfig,
    AsyncConfig,
    CheckpointConfig,
    Config,
    CriticConfig,
    DataConfig,
    DistributedConfig,
    ExperimentConfig,
    GenerationConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    RefConfig,
    RewardConfig,
    RewardModelConfig,
    RMConfig,
    RopeScalingConfig,
    SFTConfig,
    SFTWarmupConfig,
)
from jaxrlhf.config.validation import config_from_dict, config_to_dict, validate
from jaxrlhf.errors import ConfigError

__all__ = [
    "AlgorithmConfig",
    "AsyncConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "CriticConfig",
    "DataConfig",
    "DistributedConfig",
    "ExperimentConfig",
    "GenerationConfig",
    "LoggingConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RMConfig",
    "RefConfig",
    "RewardConfig",
    "RewardModelConfig",
    "RopeScalingConfig",
    "SFTConfig",
    "SFTWarmupConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "save_config",
    "validate",
    "with_overrides",
]
