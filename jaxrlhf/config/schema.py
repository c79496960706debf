"""The configuration schema: small frozen dataclasses grouped by concern, one per config group.

Each field's bounds are declared once in its metadata (``_field(0.2, gt=0, lt=1)``) and checked
by `jaxrlhf.config.validation`; rules that span several fields live there too. Configs are
frozen and hashable, so a jitted function may close over one; derive variants with
``with_overrides`` or ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "AlgorithmConfig",
    "AsyncConfig",
    "CheckpointConfig",
    "Config",
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
]


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
