"""The configuration schema: small frozen dataclasses grouped by concern, one per config group.

Each field declares its help line and bounds once, in its metadata (``_field(0.2, gt=0, lt=1,
help=...)``); `jaxrlhf.config.validation` checks them, together with the rules that span several
fields, and ``--help-config`` prints them. Fields that name a registry entry (advantage
estimator, policy loss, KL estimator, loss aggregation) are plain strings checked against the
registry, which is the one list of the names. Configs are frozen and hashable, so a jitted
function may close over one; derive variants with ``with_overrides`` or ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from jaxrlhf.algorithms import ADVANTAGE_ESTIMATORS

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
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    also: tuple[Any, ...] = (),
) -> Any:
    """A dataclass field with its one-line ``help`` and bounds (checked per element for
    tuples); ``also`` lists extra allowed values outside the bounds (e.g. -1 meaning "the
    rest"); ``factory`` builds a default group."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    meta: dict[str, Any] = {k: v for k, v in bounds.items() if v is not None}
    if also:
        meta["also"] = also
    meta["help"] = help
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


Dtype = Literal["float32", "bfloat16"]


# ----------------------------------------------------------------------------- config groups


@dataclass(frozen=True)
class ExperimentConfig:
    """What run this is and how it is driven."""

    name: str = _field("toy_ppo", help="run name; names the default output directory")
    seed: int = _field(0, ge=0, help="seed of parameter init, data order and sampling")
    output_dir: str | None = _field(None, help='run directory; None: "runs/<name>"')
    mode: Literal["sync", "async"] = _field(
        "sync", help="sync: generate then train; async: overlap them on two sub-meshes"
    )
    total_steps: int = _field(20, ge=1, help="RL (or SFT / RM) train steps of the run")
    eval_every: int = _field(0, ge=0, help="steps between evaluations; 0: never")
    max_head_offpolicyness: int = _field(
        0, ge=0, help="η: how many policy versions a sample may lag behind (async)"
    )

    def __post_init__(self) -> None:
        if self.output_dir is None:
            object.__setattr__(self, "output_dir", f"runs/{self.name}")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with global-norm clipping and a warm-up + decay learning-rate schedule."""

    lr: float = _field(1e-6, gt=0, help="peak learning rate")
    weight_decay: float = _field(0.0, ge=0, help="AdamW decoupled weight decay")
    betas: tuple[float, float] = _field((0.9, 0.999), ge=0, lt=1, help="Adam β1, β2")
    eps: float = _field(1e-8, gt=0, help="Adam ε added to the root second moment")
    grad_clip: float | None = _field(1.0, gt=0, help="max global grad norm; None: no clipping")
    warmup_steps: int = _field(0, ge=0, help="linear warm-up steps from 0 to lr")
    schedule: Literal["constant", "cosine", "linear"] = _field(
        "constant", help="learning-rate decay after the warm-up"
    )
    min_lr_ratio: float = _field(0.0, ge=0, le=1, help="final lr / lr for cosine and linear decay")


@dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling as HF configures it (``rope_scaling`` / ``rope_parameters``)."""

    rope_type: Literal["linear", "llama3"] = _field("linear", help="scaling rule")
    factor: float = _field(1.0, gt=0, help="context extension factor")
    low_freq_factor: float = _field(1.0, gt=0, help="llama3: low-frequency wavelength factor")
    high_freq_factor: float = _field(4.0, gt=0, help="llama3: high-frequency wavelength factor")
    original_max_position_embeddings: int = _field(
        8192, ge=1, help="llama3: context length the model was pre-trained at"
    )


@dataclass(frozen=True)
class ModelConfig:
    """The trained policy: where its weights come from, its shape when built from scratch, its
    dtypes and its optimizer. With ``path`` set, the architecture comes from the HF config.json
    there and the architecture fields below are ignored."""

    path: str | None = _field(None, help="local HF directory or hub name; None: build from scratch")
    model_type: Literal["llama", "qwen2", "qwen3", "mistral"] = _field(
        "qwen2", help="architecture family when built from scratch"
    )
    vocab_size: int = _field(512, ge=1, help="vocabulary size when built from scratch")
    hidden_size: int = _field(64, ge=1, help="model width D")
    intermediate_size: int = _field(256, ge=1, help="MLP width F")
    num_layers: int = _field(2, ge=1, help="decoder layers L")
    num_heads: int = _field(4, ge=1, help="query heads H")
    num_kv_heads: int = _field(2, ge=1, help="key / value heads K (grouped-query attention)")
    head_dim: int | None = _field(
        None, ge=1, help="per-head width E; None: hidden_size // num_heads"
    )
    tie_word_embeddings: bool = _field(True, help="share the embedding with the LM head")
    rope_theta: float = _field(10000.0, gt=0, help="RoPE base frequency")
    rope_scaling: RopeScalingConfig | None = _field(None, help="RoPE scaling; None: none")
    max_position_embeddings: int = _field(2048, ge=1, help="longest sequence the model accepts")
    rms_norm_eps: float = _field(1e-6, gt=0, help="ε of the RMS norms")
    initializer_range: float = _field(0.02, gt=0, help="std of the normal init from scratch")
    param_dtype: Dtype = _field("float32", help="dtype the parameters are stored in")
    compute_dtype: Dtype = _field("float32", help="dtype of the forward pass matmuls")
    remat: bool = _field(False, help="rematerialise each decoder layer in the backward pass")
    max_tokens_per_mb: int = _field(4096, ge=1, help="token budget of one micro-batch")
    optimizer: OptimizerConfig = _field(factory=OptimizerConfig, help="the actor's optimizer")


@dataclass(frozen=True)
class CriticConfig:
    """The value model: the actor's trunk (or ``path``) with a scalar head."""

    enabled: bool | None = _field(
        None, help="None: on when the advantage estimator needs values (e.g. gae)"
    )
    path: str | None = _field(None, help="HF directory; None: the actor's initial weights")
    param_dtype: Dtype = _field("float32", help="dtype the parameters are stored in")
    compute_dtype: Dtype = _field("float32", help="dtype of the forward pass matmuls")
    remat: bool = _field(False, help="rematerialise each decoder layer in the backward pass")
    max_tokens_per_mb: int = _field(4096, ge=1, help="token budget of one micro-batch")
    optimizer: OptimizerConfig = _field(
        factory=lambda: OptimizerConfig(lr=5e-6), help="the critic's optimizer (lr 5e-6)"
    )


@dataclass(frozen=True)
class RefConfig:
    """The frozen reference policy for the KL term."""

    enabled: bool | None = _field(None, help="None: on when algorithm.kl_coef > 0")
    path: str | None = _field(None, help="HF directory; None: the actor's initial weights")
    param_dtype: Dtype | None = _field(
        None, help="dtype the parameters are stored in; None: the actor's"
    )
    compute_dtype: Dtype | None = _field(
        None, help="dtype of the forward pass matmuls; None: the actor's"
    )
    max_tokens_per_mb: int = _field(4096, ge=1, help="token budget of one micro-batch")


@dataclass(frozen=True)
class RewardModelConfig:
    """An optional learned reward model scoring whole responses."""

    enabled: bool = _field(False, help="score responses with a trained reward model too")
    path: str | None = _field(None, help="required when enabled: an export of launchers/rm.py")
    param_dtype: Dtype = _field("float32", help="dtype the parameters are stored in")
    compute_dtype: Dtype = _field("float32", help="dtype of the forward pass matmuls")
    max_tokens_per_mb: int = _field(4096, ge=1, help="token budget of one micro-batch")
    weight: float = _field(
        1.0, help="reward = rule_weight * rule score + weight * reward-model score"
    )
    rule_weight: float = _field(1.0, help="weight of the rule score; 0: the reward model alone")


@dataclass(frozen=True)
class RewardConfig:
    """How a finished response is scored (before any KL penalty)."""

    fn: str | None = _field(
        None, help="reward registry name or 'module:function'; None: the task's verifier"
    )
    scale: float = _field(1.0, help="scores are multiplied by this (before clipping)")
    clip: float | None = _field(None, gt=0, help="clip scores to [-clip, clip]; None: no clip")
    workers: int = _field(0, ge=0, help="reward worker processes; 0: score in this process")
    timeout_s: float = _field(
        10.0,
        gt=0,
        help="per-response deadline: past it a response scores 0 (its reward is abandoned)",
    )


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from and how they are batched."""

    train_path: str | None = _field(
        None, help=".jsonl / .parquet / HF dataset / task name; None: the toy task"
    )
    eval_path: str | None = _field(None, help="held-out prompts, same forms; None: none")
    tokenizer: str | None = _field(
        None, help="None: actor.path's tokenizer (the built-in one if from scratch)"
    )
    prompt_key: str = _field("prompt", help="row field holding the prompt")
    answer_key: str = _field("answer", help="row field holding the reference answer")
    batch_size: int = _field(8, ge=1, help="prompts per train step (each sampled n_samples times)")
    max_prompt_len: int = _field(64, ge=1, help="prompt tokens; longer prompts are dropped")
    shuffle: bool = _field(True, help="shuffle the prompts each epoch")
    apply_chat_template: bool = _field(False, help="wrap prompts in the tokenizer's template")
    strict: bool = _field(
        False, help="true: a bad row (bad JSON, missing key, too long) is an error"
    )
    num_epochs: int | None = _field(
        None, ge=1, help="passes over the data; None: repeat (total_steps sets the length)"
    )
    eval_size: int | None = _field(256, ge=1, help="held-out prompts per evaluation; None: all")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling and the generation server's batching."""

    max_new_tokens: int = _field(32, ge=1, help="response length cap (tokens)")
    min_new_tokens: int = _field(0, ge=0, help="EOS is suppressed before this many tokens")
    temperature: float = _field(1.0, ge=0, help="sampling temperature; 0: greedy")
    top_p: float = _field(1.0, gt=0, le=1, help="nucleus sampling mass; 1: off")
    top_k: int | None = _field(None, ge=1, help="keep the k likeliest tokens; None: off")
    n_samples: int = _field(4, ge=1, help="responses per prompt (the group size for GRPO / RLOO)")
    stop_token_ids: tuple[int, ...] = _field(
        (), ge=0, help="tokens that end a response besides the tokenizer's EOS"
    )
    max_concurrent: int = _field(64, ge=1, help="decode slots of one generation server")
    decode_chunk: int = _field(
        16, ge=1, help="decode steps per call; weight updates land between calls"
    )
    prefill_rows: int = _field(16, ge=1, help="rows per prefill call of the server (a fixed shape)")


@dataclass(frozen=True)
class AlgorithmConfig:
    """The RL objective: advantage estimator, policy loss, KL and the PPO update loop."""

    advantage_estimator: str = _field(
        "gae", help="how advantages are computed (a registered advantage estimator)"
    )
    policy_loss: str = _field("ppo", help="the actor loss (a registered policy loss)")
    eps_clip: float = _field(0.2, gt=0, lt=1, help="PPO ratio clip ε (low side)")
    eps_clip_high: float | None = _field(
        None, gt=0, help="upper ratio clip (DAPO clip-higher); None: eps_clip"
    )
    dual_clip: float | None = _field(None, gt=1, help="c of dual-clip PPO; None: off")
    value_eps_clip: float | None = _field(
        0.2, gt=0, help="critic value clip around the old values; None: unclipped"
    )
    gamma: float = _field(1.0, ge=0, le=1, help="discount γ")
    lam: float = _field(1.0, ge=0, le=1, help="GAE λ")
    kl_coef: float = _field(0.0, ge=0, help="weight of the KL to the reference; 0: no KL")
    kl_estimator: str = _field(
        "k3", help="how the KL to the reference is estimated (a registered KL estimator)"
    )
    kl_in_reward: bool = _field(
        False, help="true: subtract the KL from rewards; false: add it to the loss"
    )
    entropy_coef: float = _field(0.0, ge=0, help="weight of the entropy bonus")
    ppo_epochs: int = _field(1, ge=1, help="passes over each batch of trajectories")
    n_minibatches: int = _field(1, ge=1, help="optimizer steps per epoch")
    loss_agg: str | None = _field(
        None,
        help="a registered loss aggregation; None: the policy loss's, else the estimator's default",
    )
    loss_norm_constant: float | None = _field(
        None, gt=0, help="divisor of seq_mean_token_sum_norm; None: the estimator's default"
    )
    adv_norm: bool = _field(True, help="whiten advantages over the batch")
    decoupled_loss: bool = _field(
        False, help="ratio against recomputed proximal log-probs (needed by async PPO)"
    )
    behav_imp_weight_cap: float | None = _field(
        None, ge=1, help="cap on π_prox / π_behaviour; None: no cap"
    )
    behav_imp_weight_mode: Literal["truncate", "mask"] = _field(
        "truncate", help="what the cap does: truncate the weight, or mask the token"
    )
    overlong_buffer_len: int | None = _field(
        None, ge=1, help="DAPO overlong penalty over the last N tokens before the cap; None: off"
    )
    overlong_penalty_factor: float = _field(
        1.0, ge=0, help="DAPO overlong penalty at the length cap (falls linearly to it)"
    )
    truncation: Literal["bootstrap", "terminal"] | None = _field(
        None, help="cut responses: bootstrap from the value, or terminal; None: per critic"
    )
    max_bad_steps: int = _field(
        3,
        ge=1,
        help="consecutive steps with non-finite values (skipped updates) that stop the run",
    )


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; their product must equal the device count. -1: the rest."""

    data: int = _field(-1, ge=1, also=(-1,), help="data-parallel axis; -1: the rest")
    fsdp: int = _field(1, ge=1, help="parameter-sharding (FSDP) axis")
    tensor: int = _field(1, ge=1, help="tensor-parallel axis (heads, MLP, vocab)")


@dataclass(frozen=True)
class CheckpointConfig:
    """When and where train state is saved, and whether a run resumes."""

    dir: str | None = _field(None, help='None: "<experiment.output_dir>/checkpoints"')
    save_every: int = _field(0, ge=0, help="steps between saves; 0: only at the end")
    max_to_keep: int | None = _field(3, ge=1, help="checkpoints kept; None: all")
    resume: bool = _field(True, help="resume from the latest checkpoint in dir if there is one")
    save_hf: bool = _field(False, help="also export the final actor as an HF directory")
    async_save: bool = _field(
        True, help="write in the background; a partial save is never resumed from"
    )
    keep_best_metric: str | None = _field(
        None, help='e.g. "eval/reward": also keep the best checkpoint(s); None: off'
    )
    best_mode: Literal["max", "min"] = _field("max", help="whether the best metric is high or low")


@dataclass(frozen=True)
class LoggingConfig:
    """Metric sinks and console output."""

    level: Literal["debug", "info", "warning", "error"] = _field("info", help="console log level")
    log_every: int = _field(1, ge=1, help="steps between metric lines")
    progress: bool = _field(True, help="show a progress bar")
    jsonl: bool = _field(True, help="write metrics.jsonl in the output directory")
    tensorboard: bool = _field(False, help="write TensorBoard event files")
    wandb: bool = _field(False, help="log to Weights & Biases")
    wandb_project: str | None = _field(None, help="W&B project; None: the experiment name")


@dataclass(frozen=True)
class SFTWarmupConfig:
    """Supervised warm start of the actor on the task's reference answers before RL (toy runs)."""

    steps: int = _field(0, ge=0, help="supervised updates before RL; 0: no warm start")
    lr: float = _field(1e-3, gt=0, help="learning rate of the warm start")
    batch_size: int = _field(32, ge=1, help="prompt + answer sequences per update")


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning (``launchers/sft.py``): which dataset keys hold the text."""

    response_key: str = _field(
        "response", help="row field of the response (with data.prompt_key as the prompt)"
    )
    messages_key: str = _field(
        "messages", help="row field of a chat-message list (used when the row has it)"
    )
    max_seq_len: int = _field(512, ge=1, help="prompt + response tokens; longer rows are dropped")
    packing: bool = _field(
        True, help="pack several sequences per row (segment ids) instead of padding"
    )


@dataclass(frozen=True)
class RMConfig:
    """Bradley-Terry reward-model training (``launchers/rm.py``) on chosen / rejected pairs."""

    chosen_key: str = _field("chosen", help="row field of the preferred response")
    rejected_key: str = _field("rejected", help="row field of the rejected response")
    max_seq_len: int = _field(512, ge=1, help="prompt + response tokens; longer pairs are dropped")
    packing: bool = _field(
        True, help="pack several sequences per row (segment ids) instead of padding"
    )


@dataclass(frozen=True)
class AsyncConfig:
    """Asynchronous PPO (``experiment.mode: async``): how devices are split and rollouts run."""

    allocation: str | None = _field(
        None, help='devices per role, e.g. "gen=2,train=2"; None: half each'
    )
    generator: Literal["thread", "process"] = _field(
        "thread", help="run the generation server as a thread here or as its own process"
    )
    proximal: Literal["recompute", "fused"] = _field(
        "recompute",
        help="π_prox: recompute (a log-prob pass) or fused (needs one update per batch)",
    )


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process (multi-host) runs: ``jax.distributed`` and failure detection."""

    enabled: bool | None = _field(
        None, help="None: when configured or detected; true: always; false: never"
    )
    coordinator_address: str | None = _field(
        None, help='"host:port" of process 0; None: auto-detect or single process'
    )
    num_processes: int | None = _field(None, ge=1, help="processes in the run; None: detect")
    process_id: int | None = _field(None, ge=0, help="this process's index; None: detect")
    heartbeat_timeout_s: float = _field(
        60.0, gt=0, help="a silent peer is declared dead after this many seconds"
    )
    initialization_timeout_s: float = _field(
        300.0, gt=0, help="seconds to wait for every process to join"
    )


@dataclass(frozen=True)
class Config:
    """The whole experiment; one group per concern."""

    experiment: ExperimentConfig = _field(factory=ExperimentConfig, help="the run")
    actor: ModelConfig = _field(factory=ModelConfig, help="the trained policy")
    critic: CriticConfig = _field(factory=CriticConfig, help="the value model")
    ref: RefConfig = _field(factory=RefConfig, help="the frozen reference policy")
    reward_model: RewardModelConfig = _field(
        factory=RewardModelConfig, help="an optional learned reward model"
    )
    reward: RewardConfig = _field(factory=RewardConfig, help="how responses are scored")
    data: DataConfig = _field(factory=DataConfig, help="prompts and batching")
    generation: GenerationConfig = _field(factory=GenerationConfig, help="sampling")
    algorithm: AlgorithmConfig = _field(factory=AlgorithmConfig, help="the RL objective")
    mesh: MeshConfig = _field(factory=MeshConfig, help="the device mesh")
    checkpoint: CheckpointConfig = _field(factory=CheckpointConfig, help="saving and resuming")
    logging: LoggingConfig = _field(factory=LoggingConfig, help="metrics and console output")
    sft_warmup: SFTWarmupConfig = _field(
        factory=SFTWarmupConfig, help="supervised warm start before RL"
    )
    sft: SFTConfig = _field(factory=SFTConfig, help="supervised fine-tuning")
    rm: RMConfig = _field(factory=RMConfig, help="reward-model training")
    async_ppo: AsyncConfig = _field(factory=AsyncConfig, help="asynchronous PPO")
    distributed: DistributedConfig = _field(factory=DistributedConfig, help="multi-process runs")

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
        return bool(
            ADVANTAGE_ESTIMATORS.info(self.algorithm.advantage_estimator).get("needs_values")
        )

    @property
    def use_ref(self) -> bool:
        """Whether reference logprobs are computed."""
        return self.ref.enabled if self.ref.enabled is not None else self.algorithm.kl_coef > 0
