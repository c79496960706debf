"""Typed experiment configuration: small frozen dataclasses grouped by concern, YAML files and
dotted command-line overrides (the AReaL / verl convention)::

    cfg = load_config("configs/toy_ppo.yaml", ["actor.optimizer.lr=1e-6", "mesh.fsdp=2"])
    cfg.actor.optimizer.lr          # 1e-06
    save_config(cfg, f"{cfg.experiment.output_dir}/config.yaml")

Every value is checked by one generic routine driven by the field's type hint (int, float, bool,
str, Optional, Literal, list / tuple, nested dataclass) and by the bounds declared once in the
field's metadata (``_field(0.2, gt=0, lt=1)``); rules that span several fields live in
``_check_cross_fields``. Every bad input raises ``ConfigError`` with one sentence that names the
key, the value and what was expected. Configs are frozen and hashable, so a jitted function may
close over one; derive variants with ``with_overrides`` or ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import shlex
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from jaxrlhf.registry import RegistryError

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "CriticConfig",
    "DataConfig",
    "ExperimentConfig",
    "GenerationConfig",
    "LoggingConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RefConfig",
    "RewardConfig",
    "RewardModelConfig",
    "RopeScalingConfig",
    "SFTWarmupConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "main_guard",
    "parse_cli",
    "save_config",
    "validate",
    "with_overrides",
]


class ConfigError(ValueError):
    """A bad config file, key, value or override; the message is one sentence for the user."""


def _field(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    also: tuple[Any, ...] = (),
) -> Any:
    """A dataclass field with bounds (checked per element for tuples); ``also`` lists extra
    allowed values outside the bounds (e.g. -1 meaning "fill")."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    meta = {k: v for k, v in bounds.items() if v is not None}
    if also:
        meta["also"] = also
    return field(default=default, metadata=meta)


Dtype = Literal["float32", "bfloat16"]


# ----------------------------------------------------------------------------- config groups


@dataclass(frozen=True)
class ExperimentConfig:
    """What run this is and how it is driven."""

    name: str = "toy_ppo"
    seed: int = _field(0, ge=0)
    output_dir: str | None = None  # None: "runs/<name>" (filled in on construction)
    mode: Literal["sync", "async"] = "sync"
    total_steps: int = _field(20, ge=1)
    eval_every: int = _field(0, ge=0)  # steps between evaluations; 0: never
    max_head_offpolicyness: int = _field(0, ge=0)  # η: how many versions a sample may lag (async)

    def __post_init__(self) -> None:
        if self.output_dir is None:
            object.__setattr__(self, "output_dir", f"runs/{self.name}")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a warm-up + decay learning-rate schedule."""

    lr: float = _field(1e-6, gt=0)
    weight_decay: float = _field(0.0, ge=0)
    betas: tuple[float, float] = _field((0.9, 0.999), ge=0, lt=1)
    eps: float = _field(1e-8, gt=0)
    grad_clip: float | None = _field(1.0, gt=0)  # max global grad norm; None: no clipping
    warmup_steps: int = _field(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = _field(0.0, ge=0, le=1)  # final lr / lr for cosine and linear decay


@dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling as HF configures it (``rope_scaling`` / ``rope_parameters``)."""

    rope_type: Literal["linear", "llama3"] = "linear"
    factor: float = _field(1.0, gt=0)
    low_freq_factor: float = _field(1.0, gt=0)  # llama3 only
    high_freq_factor: float = _field(4.0, gt=0)  # llama3 only
    original_max_position_embeddings: int = _field(8192, ge=1)  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    """The trained policy: where its weights come from, its shape when built from scratch, its
    dtypes and its optimizer. With ``path`` set, the architecture comes from the HF config.json
    there and the architecture fields below are ignored."""

    path: str | None = None  # local HF directory or hub name; None: build from scratch
    model_type: Literal["llama", "qwen2", "qwen3", "mistral"] = "qwen2"
    vocab_size: int = _field(512, ge=1)
    hidden_size: int = _field(64, ge=1)
    intermediate_size: int = _field(256, ge=1)
    num_layers: int = _field(2, ge=1)
    num_heads: int = _field(4, ge=1)
    num_kv_heads: int = _field(2, ge=1)
    head_dim: int | None = _field(None, ge=1)  # None: hidden_size // num_heads
    tie_word_embeddings: bool = True
    rope_theta: float = _field(10000.0, gt=0)
    rope_scaling: RopeScalingConfig | None = None
    max_position_embeddings: int = _field(2048, ge=1)
    rms_norm_eps: float = _field(1e-6, gt=0)
    initializer_range: float = _field(0.02, gt=0)
    param_dtype: Dtype = "float32"
    compute_dtype: Dtype = "float32"
    remat: bool = False  # rematerialise each decoder layer in the backward pass
    max_tokens_per_mb: int = _field(4096, ge=1)  # token budget of one micro-batch
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass(frozen=True)
class CriticConfig:
    """The value model: the actor's trunk (or ``path``) with a scalar head."""

    enabled: bool | None = None  # None: on when the advantage estimator needs values (gae)
    path: str | None = None  # None: start from the actor's initial weights
    param_dtype: Dtype = "float32"
    compute_dtype: Dtype = "float32"
    remat: bool = False
    max_tokens_per_mb: int = _field(4096, ge=1)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-6))


@dataclass(frozen=True)
class RefConfig:
    """The frozen reference policy for the KL term."""

    enabled: bool | None = None  # None: on when algorithm.kl_coef > 0
    path: str | None = None  # None: the actor's initial weights
    param_dtype: Dtype = "float32"
    compute_dtype: Dtype = "float32"
    max_tokens_per_mb: int = _field(4096, ge=1)


@dataclass(frozen=True)
class RewardModelConfig:
    """An optional learned reward model scoring whole responses."""

    enabled: bool = False
    path: str | None = None  # required when enabled: an export of launchers/rm.py
    param_dtype: Dtype = "float32"
    compute_dtype: Dtype = "float32"
    max_tokens_per_mb: int = _field(4096, ge=1)
    weight: float = 1.0  # reward = rule_weight * rule score + weight * reward-model score
    rule_weight: float = 1.0  # 0: the reward model alone


@dataclass(frozen=True)
class RewardConfig:
    """How a finished response is scored (before any KL penalty)."""

    fn: str | None = None  # registry name or "module:function"; None: the data task's verifier
    scale: float = 1.0
    clip: float | None = _field(None, gt=0)  # clip scores to [-clip, clip]
    workers: int = _field(0, ge=0)  # reward worker processes; 0: score in this process
    timeout_s: float = _field(10.0, gt=0)  # per-response deadline in the workers (scores 0 past it)


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from and how they are batched."""

    train_path: str | None = None  # .jsonl / .parquet / HF dataset / task name; None: toy task
    eval_path: str | None = None
    tokenizer: str | None = None  # None: actor.path's tokenizer (built-in byte one if from scratch)
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    batch_size: int = _field(8, ge=1)  # prompts per train step (each sampled n_samples times)
    max_prompt_len: int = _field(64, ge=1)  # tokens; longer prompts are dropped
    shuffle: bool = True
    apply_chat_template: bool = False
    strict: bool = False  # True: a bad row (bad JSON, missing key, too long) is an error
    num_epochs: int | None = _field(None, ge=1)  # None: repeat; the run length is total_steps
    eval_size: int | None = _field(256, ge=1)  # held-out prompts per evaluation; None: all


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling and the generation server's batching."""

    max_new_tokens: int = _field(32, ge=1)
    min_new_tokens: int = _field(0, ge=0)
    temperature: float = _field(1.0, ge=0)  # 0: greedy
    top_p: float = _field(1.0, gt=0, le=1)
    top_k: int | None = _field(None, ge=1)  # None: no top-k filtering
    n_samples: int = _field(4, ge=1)  # responses per prompt (the group size for GRPO / RLOO)
    stop_token_ids: tuple[int, ...] = _field((), ge=0)  # besides the tokenizer's EOS
    max_concurrent: int = _field(64, ge=1)  # decode slots of one generation server
    decode_chunk: int = _field(16, ge=1)  # decode steps per call; weight updates land between
    prefill_rows: int = _field(16, ge=1)  # rows per prefill call of the server (fixed shape)


@dataclass(frozen=True)
class AlgorithmConfig:
    """The RL objective: advantage estimator, policy loss, KL and the PPO update loop."""

    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "gae"
    policy_loss: Literal["ppo", "gspo"] = "ppo"
    eps_clip: float = _field(0.2, gt=0, lt=1)
    eps_clip_high: float | None = _field(None, gt=0)  # None: same as eps_clip
    dual_clip: float | None = _field(None, gt=1)  # c of dual-clip PPO; None: off
    value_eps_clip: float | None = _field(0.2, gt=0)  # None: unclipped value loss
    gamma: float = _field(1.0, ge=0, le=1)
    lam: float = _field(1.0, ge=0, le=1)
    kl_coef: float = _field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in_reward: bool = False  # True: subtract the KL from rewards; False: add it to the loss
    entropy_coef: float = _field(0.0, ge=0)
    ppo_epochs: int = _field(1, ge=1)
    n_minibatches: int = _field(1, ge=1)  # optimizer steps per epoch
    loss_agg: Literal[
        "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"
    ] = "token_mean"
    loss_norm_constant: float | None = _field(None, gt=0)  # seq_mean_token_sum_norm; None: T
    adv_norm: bool = True  # whiten advantages over the batch
    decoupled_loss: bool = False  # ratio against recomputed proximal logprobs (async PPO)
    behav_imp_weight_cap: float | None = _field(None, ge=1)  # cap on π_prox / π_behaviour
    behav_imp_weight_mode: Literal["truncate", "mask"] = "truncate"  # what the cap does
    # DAPO soft overlong punishment: scores fall linearly by up to overlong_penalty_factor over
    # the last overlong_buffer_len tokens before generation.max_new_tokens; None: off
    overlong_buffer_len: int | None = _field(None, ge=1)
    overlong_penalty_factor: float = _field(1.0, ge=0)
    # A response cut at max_new_tokens: "bootstrap" from the critic's value at the cut, or
    # "terminal" (its last token ends the episode); None: bootstrap with a critic, else terminal
    truncation: Literal["bootstrap", "terminal"] | None = None


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; their product must equal the device count. -1: the rest."""

    data: int = _field(-1, ge=1, also=(-1,))
    fsdp: int = _field(1, ge=1)
    tensor: int = _field(1, ge=1)


@dataclass(frozen=True)
class CheckpointConfig:
    """When and where train state is saved, and whether a run resumes."""

    dir: str | None = None  # None: "<experiment.output_dir>/checkpoints" (filled in)
    save_every: int = _field(0, ge=0)  # steps between saves; 0: only at the end
    max_to_keep: int | None = _field(3, ge=1)  # None: keep all
    resume: bool = True  # resume from the latest checkpoint in dir if there is one
    save_hf: bool = False  # also export the final actor as an HF directory
    async_save: bool = True  # write in the background; a partial save is never resumed from
    keep_best_metric: str | None = None  # e.g. "eval/reward": also keep the best checkpoint(s)
    best_mode: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class LoggingConfig:
    """Metric sinks and console output."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    log_every: int = _field(1, ge=1)
    progress: bool = True
    jsonl: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str | None = None


@dataclass(frozen=True)
class SFTWarmupConfig:
    """Supervised warm start of the actor on the task's reference answers before RL (toy runs)."""

    steps: int = _field(0, ge=0)  # 0: no warm start
    lr: float = _field(1e-3, gt=0)
    batch_size: int = _field(32, ge=1)  # prompt + answer sequences per update


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning (``launchers/sft.py``): which dataset keys hold the text."""

    response_key: str = "response"  # with data.prompt_key: a prompt / response pair per row
    messages_key: str = "messages"  # or a chat-message list (used when the row has it)
    max_seq_len: int = _field(512, ge=1)  # prompt + response tokens; longer rows are dropped
    packing: bool = True  # pack several sequences per row (segment ids) instead of padding


@dataclass(frozen=True)
class RMConfig:
    """Bradley-Terry reward-model training (``launchers/rm.py``) on chosen / rejected pairs."""

    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    max_seq_len: int = _field(512, ge=1)  # prompt + response tokens; longer pairs are dropped
    packing: bool = True  # pack several sequences per row (segment ids) instead of padding


@dataclass(frozen=True)
class AsyncConfig:
    """Asynchronous PPO (``experiment.mode: async``): how devices are split and rollouts run."""

    allocation: str | None = None  # "gen=2,train=2"; None: half the devices each
    # Where the generation server runs: a thread of this process on the generation sub-mesh,
    # or its own process (own devices, pinned to its own CPU cores on a CPU host).
    generator: Literal["thread", "process"] = "thread"
    # π_prox for the decoupled loss: "recompute" runs a log-prob pass (actor_inf) before the
    # update; "fused" takes stop_gradient(π_θ) inside the one update of the batch (exact only
    # with ppo_epochs = n_minibatches = 1, and one forward pass cheaper).
    proximal: Literal["recompute", "fused"] = "recompute"


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process (multi-host) runs: ``jax.distributed`` and failure detection."""

    enabled: bool | None = None  # None: when configured or detected; true: always; false: never
    coordinator_address: str | None = None  # "host:port"; None: auto-detect or single process
    num_processes: int | None = _field(None, ge=1)
    process_id: int | None = _field(None, ge=0)
    heartbeat_timeout_s: float = _field(60.0, gt=0)  # a silent peer is declared dead after this
    initialization_timeout_s: float = _field(300.0, gt=0)  # waiting for every process to join


@dataclass(frozen=True)
class Config:
    """The whole experiment; one group per concern."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    actor: ModelConfig = field(default_factory=ModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft_warmup: SFTWarmupConfig = field(default_factory=SFTWarmupConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    async_ppo: AsyncConfig = field(default_factory=AsyncConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if self.checkpoint.dir is None:
            ckpt = dataclasses.replace(
                self.checkpoint, dir=f"{self.experiment.output_dir}/checkpoints"
            )
            object.__setattr__(self, "checkpoint", ckpt)

    @property
    def use_critic(self) -> bool:
        """Whether a value model is built and trained."""
        if self.critic.enabled is not None:
            return self.critic.enabled
        return self.algorithm.advantage_estimator == "gae"

    @property
    def use_ref(self) -> bool:
        """Whether reference logprobs are computed."""
        return self.ref.enabled if self.ref.enabled is not None else self.algorithm.kl_coef > 0


def _check_cross_fields(cfg: Config) -> None:
    """Rules that involve more than one field, all in one place."""
    a, g, m, d = cfg.algorithm, cfg.generation, cfg.actor, cfg.data
    n_seqs, seq_len = d.batch_size * g.n_samples, d.max_prompt_len + g.max_new_tokens
    rules: list[tuple[bool, str]] = [
        (not cfg.experiment.name.strip(), "experiment.name must not be empty"),
        (
            a.eps_clip_high is not None and a.eps_clip_high < a.eps_clip,
            f"algorithm.eps_clip_high ({a.eps_clip_high}) must be >= "
            f"algorithm.eps_clip ({a.eps_clip})",
        ),
        (
            cfg.critic.enabled is False and a.advantage_estimator == "gae",
            "algorithm.advantage_estimator 'gae' needs a critic, but critic.enabled is false",
        ),
        (
            a.advantage_estimator in ("grpo", "dr_grpo", "rloo") and g.n_samples < 2,
            f"algorithm.advantage_estimator {a.advantage_estimator!r} compares responses "
            f"within a group, so generation.n_samples must be >= 2, got {g.n_samples}",
        ),
        (
            cfg.ref.enabled is False and a.kl_coef > 0,
            f"algorithm.kl_coef is {a.kl_coef} but ref.enabled is false; set kl_coef=0 "
            "or enable the reference model",
        ),
        (
            cfg.reward_model.enabled and cfg.reward_model.path is None,
            "reward_model.path must be set when reward_model.enabled is true",
        ),
        (
            cfg.reward_model.enabled
            and not (cfg.reward_model.weight or cfg.reward_model.rule_weight),
            "reward_model.weight and reward_model.rule_weight are both 0, so every reward is 0",
        ),
        (
            g.min_new_tokens > g.max_new_tokens,
            f"generation.min_new_tokens ({g.min_new_tokens}) must be <= "
            f"generation.max_new_tokens ({g.max_new_tokens})",
        ),
        (
            n_seqs % a.n_minibatches != 0,
            f"data.batch_size * generation.n_samples ({n_seqs} sequences) must be divisible "
            f"by algorithm.n_minibatches ({a.n_minibatches})",
        ),
        (
            m.path is None and m.head_dim is None and m.hidden_size % m.num_heads != 0,
            f"actor.hidden_size ({m.hidden_size}) must be divisible by actor.num_heads "
            f"({m.num_heads}) unless actor.head_dim is set",
        ),
        (
            m.path is None and m.num_heads % m.num_kv_heads != 0,
            f"actor.num_heads ({m.num_heads}) must be divisible by actor.num_kv_heads "
            f"({m.num_kv_heads})",
        ),
        (
            m.path is None and seq_len > m.max_position_embeddings,
            f"data.max_prompt_len + generation.max_new_tokens ({seq_len}) must be <= "
            f"actor.max_position_embeddings ({m.max_position_embeddings})",
        ),
        (
            cfg.distributed.num_processes is not None
            and cfg.distributed.process_id is not None
            and cfg.distributed.process_id >= cfg.distributed.num_processes,
            f"distributed.process_id ({cfg.distributed.process_id}) must be < "
            f"distributed.num_processes ({cfg.distributed.num_processes})",
        ),
        (
            cfg.async_ppo.proximal == "fused" and a.ppo_epochs * a.n_minibatches != 1,
            "async_ppo.proximal 'fused' takes π_prox from the single update of a batch; it "
            f"needs ppo_epochs = n_minibatches = 1, got {a.ppo_epochs} and {a.n_minibatches}",
        ),
    ]
    for broken, message in rules:
        if broken:
            raise ConfigError(message)


# ----------------------------------------------------------------------------- generic machinery

_NoneType = type(None)


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple | dict):
        return yaml.safe_dump(_plain(value), default_flow_style=True, width=1000).strip()
    return repr(value)


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _describe(tp: Any) -> str:
    """An expected type in words."""
    if tp is bool:
        return "a boolean (true or false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return "a mapping of settings"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if _is_union(tp):
        words = [_describe(a) for a in args if a is not _NoneType]
        return " or ".join(words) + (" or null" if _NoneType in args else "")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list (of {_describe(args[0])} each)"
    if origin is tuple:
        return f"a list of {len(args)} values"
    if origin is list:
        return f"a list (of {_describe(args[0])} each)"
    if origin is dict:
        return "a mapping"
    return str(tp)


class _TypeMismatch(ConfigError):
    def __init__(self, key: str, value: Any, tp: Any) -> None:
        self.key = key
        super().__init__(
            f"config key '{key}' expects {_describe(tp)}, got {_show(value)} ({_kind(value)})"
        )


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in get_type_hints(cls).items() if k in names}


def _group_class(tp: Any) -> type | None:
    """The dataclass behind ``tp`` (itself, or inside Optional), or None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        classes = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and convert it (YAML list -> tuple, int or
    numeric string -> float, mapping -> dataclass)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None:
            if _NoneType in args:
                return None
            raise _TypeMismatch(key, value, tp)
        for arg in (a for a in args if a is not _NoneType):
            try:
                return _coerce(value, arg, key)
            except _TypeMismatch as err:
                if err.key != key:  # an item deeper down is wrong: report that one
                    raise
        raise _TypeMismatch(key, value, tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"config key '{key}' must be {_describe(tp)}, got {_show(value)}{hint}"
            )
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _as_number(value)
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)
    elif tp is float:
        number = float(value) if type(value) is int else _as_number(value)
        if number is not None and not math.isnan(number):
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, list | tuple):
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(value) != len(args):
                    raise _TypeMismatch(key, value, tp)
                item_types = args
            else:
                item_types = (args[0],) * len(value)
            items = [
                _coerce(v, t, f"{key}[{i}]")
                for i, (v, t) in enumerate(zip(value, item_types, strict=True))
            ]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, Mapping):
            return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"config.py does not know how to check the type {tp!r} of '{key}'")
    raise _TypeMismatch(key, value, tp)


def _as_number(value: Any) -> float | None:
    """YAML 1.1 reads '1e-6' (no dot) as a string; accept such numeric strings as numbers."""
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            return None
    return None


def _check_bounds(key: str, value: Any, meta: Mapping[str, Any], written: Any) -> None:
    """Check ``value`` (per element for lists) against the field's bounds; messages show the
    value as ``written``."""
    bounds = {k: meta[k] for k in ("ge", "gt", "le", "lt") if k in meta}
    if value is None or not bounds:
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_bounds(f"{key}[{i}]", item, meta, written[i])
        return
    if value in meta.get("also", ()):
        return
    ok = {
        "ge": lambda b: value >= b,
        "gt": lambda b: value > b,
        "le": lambda b: value <= b,
        "lt": lambda b: value < b,
    }
    if all(ok[k](b) for k, b in bounds.items()):
        return
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    expected = " and ".join(f"{words[k]} {_show(b)}" for k, b in bounds.items())
    expected += "".join(f" or {_show(v)}" for v in meta.get("also", ()))
    raise ConfigError(f"config key '{key}' must be {expected}, got {_show(written)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass ``cls`` from a mapping, checking every key and value."""
    if not isinstance(data, Mapping):
        if not prefix:
            raise ConfigError(f"a config must be a mapping of groups, got {_kind(data)}")
        raise ConfigError(
            f"config key '{prefix}' is a group of settings and expects a mapping, "
            f"got {_show(data)} ({_kind(data)})"
        )
    hints = _hints(cls)
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            raise _unknown_key(key)
        kwargs[name] = _coerce(value, hints[name], key)
        _check_bounds(key, kwargs[name], meta[name], value)
    return cls(**kwargs)


@functools.cache
def _all_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of ``cls``, groups included."""
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}.{name}" if prefix else name
        keys.append(key)
        sub = _group_class(tp)
        if sub is not None:
            keys.extend(_all_keys(sub, key))
    return tuple(keys)


def _unknown_key(key: str) -> ConfigError:
    keys = _all_keys()
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    guess = None
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        guess = f"{parent}.{close[0]}" if parent else close[0]
    else:  # the same name in another group, e.g. 'actor.lr' -> 'actor.optimizer.lr'
        same = [k for k in keys if k.rpartition(".")[2] == leaf]
        if same:
            guess = max(same, key=lambda k: len(_common_prefix(k, key)))
        elif parent and parent not in keys:  # a typo in a group name
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            guess = close[0] if close else None
    if guess is not None:
        return ConfigError(f"unknown config key '{key}'; did you mean '{guess}'?")
    while parent and parent not in keys:  # name the valid keys under the deepest valid group
        parent = parent.rpartition(".")[0]
    valid = ", ".join(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)
    where = f"under '{parent}'" if parent else "at the top level"
    return ConfigError(f"unknown config key '{key}'; valid keys {where} are {valid}")


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _plain(obj: Any) -> Any:
    """Dataclasses -> dicts and tuples -> lists, recursively (YAML-ready)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- YAML and overrides


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_show(key)} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file '{path}': {err}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context or "syntax error"
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of config groups "
            f"(experiment, actor, ...), got {_kind(data)}"
        )
    return data


def _apply_override(raw: dict[str, Any], text: str) -> None:
    """Set one ``dotted.key=value`` in the raw (pre-validation) config mapping."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override {text!r} must have the form key=value, e.g. 'actor.optimizer.lr=1e-6'"
        )
    parts = key.split(".")
    tp: Any = Config
    for i, part in enumerate(parts):
        cls = _group_class(tp)
        if cls is None:
            group = ".".join(parts[:i])
            raise ConfigError(
                f"config key '{group}' is a single value, not a group, so override key "
                f"'{key}' does not exist"
            )
        if part not in _hints(cls):
            raise _unknown_key(key)
        tp = _hints(cls)[part]
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "syntax error"
        raise ConfigError(
            f"override {text!r} has a value that is not valid YAML: {problem}"
        ) from None
    if isinstance(value, bool | int | float) and _wants_string(tp):
        value = value_text.strip()  # e.g. experiment.name=2024 stays the string '2024'
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}  # absent, or null for an Optional group being filled in
        node = node[part]
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict) and _group_class(tp):
        node[last] = _merge(node[last], value)
    else:
        node[last] = value


def _wants_string(tp: Any) -> bool:
    kinds = [a for a in get_args(tp) if a is not _NoneType] if _is_union(tp) else [tp]
    return kinds == [str]


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        both = isinstance(out.get(k), dict) and isinstance(v, Mapping)
        out[k] = _merge(out[k], v) if both else v
    return out


# ----------------------------------------------------------------------------- public API


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a (YAML-shaped) mapping; missing keys take defaults."""
    cfg = _build(Config, d, "")
    _check_cross_fields(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars."""
    return _plain(cfg)


class _Dumper(yaml.SafeDumper):
    """Block-style groups, flow-style lists: ``betas: [0.9, 0.999]``."""


_Dumper.add_representer(
    list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML that ``load_config`` reads back to an equal Config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, width=100)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config to ``path`` (parent directories are created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(config_to_yaml(cfg), encoding="utf-8")


def validate(cfg: Config) -> Config:
    """Check a Config built in Python (constructors do not check values)."""
    return config_from_dict(config_to_dict(cfg))


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (defaults when ``path`` is None), apply ``key=value`` overrides (values
    are YAML scalars or lists, ``null`` for None) and validate."""
    raw = _read_yaml(path) if path is not None else {}
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    for text in overrides:
        _apply_override(raw, text)
    return config_from_dict(raw)


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with dotted ``key=value`` overrides applied and validated."""
    raw = config_to_dict(cfg)  # fresh containers, safe to edit
    for text in overrides:
        _apply_override(raw, text)
    return config_from_dict(raw)


_USAGE = "usage: {prog} [--config FILE.yaml] [dotted.key=value ...]"


def parse_cli(argv: Sequence[str] | None = None, default_config: str | None = None) -> Config:
    """A launcher's command line: ``[--config FILE] [key=value ...]`` -> validated Config."""
    args = list(sys.argv[1:] if argv is None else argv)
    path, overrides = default_config, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            print(_USAGE.format(prog=Path(sys.argv[0]).name))
            raise SystemExit(0)
        if arg in ("-c", "--config"):
            if i + 1 >= len(args):
                raise ConfigError(f"option {arg} needs a file name after it")
            path, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; expected --config FILE and key=value pairs")
        else:
            overrides.append(arg)
        i += 1
    return load_config(path, overrides)


P = ParamSpec("P")
R = TypeVar("R")


def main_guard(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a launcher's ``main``: a ConfigError (or an unknown registry name picked in the
    config) or a bad dataset (`DataError`) becomes one line on stderr and exit code 2, never a
    traceback."""

    @functools.wraps(fn)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        from jaxrlhf.data.readers import DataError  # lazily: config must not import the data stack

        try:
            return fn(*args, **kwargs)
        except (ConfigError, RegistryError, DataError) as err:
            kind = "data" if isinstance(err, DataError) else "config"
            message = " ".join(str(err).split())
            print(f"{kind} error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    return guarded
