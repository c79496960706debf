"""Config -> the static, config-free specs the interfaces compile on.

`jaxrlhf.interfaces` never reads the configuration: its steps take frozen, hashable specs
(`ActorLossSpec`, `CriticLossSpec`, `OptimizerSpec`), so compiled steps are cached on them. This
module is the one place that reads ``algorithm.*`` / ``*.optimizer`` to build them.
"""

from __future__ import annotations

import dataclasses

from jaxrlhf.algorithms import effective_loss_aggregation
from jaxrlhf.config import AlgorithmConfig, OptimizerConfig
from jaxrlhf.interfaces import ActorLossSpec, CriticLossSpec
from jaxrlhf.optim import OptimizerSpec


def actor_loss_spec(
    algo: AlgorithmConfig,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    logits_chunk: int | None = None,
    on_policy: bool = False,
) -> ActorLossSpec:
    """The objective ``algorithm.*`` describes (KL in the loss unless ``kl_in_reward``); the
    aggregation and its constant as `effective_loss_aggregation` resolves them (``max_new_tokens``
    is ``generation.max_new_tokens``, Dr.GRPO's normaliser)."""
    aggregation, norm_constant = effective_loss_aggregation(
        algo.policy_loss, algo.advantage_estimator, algo.loss_agg, algo.loss_norm_constant,
        max_new_tokens,
    )  # fmt: skip
    return ActorLossSpec(
        policy_loss=algo.policy_loss,
        eps_clip=algo.eps_clip,
        eps_clip_high=algo.eps_clip_high,
        dual_clip=algo.dual_clip,
        decoupled=algo.decoupled_loss,
        behaviour_weight_cap=algo.behav_imp_weight_cap,
        behaviour_weight_mode=algo.behav_imp_weight_mode,
        aggregation=aggregation,
        norm_constant=norm_constant,
        kl_coef=0.0 if algo.kl_in_reward else algo.kl_coef,
        kl_estimator=algo.kl_estimator,
        entropy_coef=algo.entropy_coef,
        on_policy=on_policy,
        temperature=temperature,
        logits_chunk=logits_chunk,
    )


def critic_loss_spec(algo: AlgorithmConfig, **overrides: object) -> CriticLossSpec:
    """Value clipping from ``algorithm.value_eps_clip``; token-mean MSE unless overridden."""
    return CriticLossSpec(value_clip=algo.value_eps_clip, **overrides)  # type: ignore[arg-type]


def optimizer_spec(opt: OptimizerConfig) -> OptimizerSpec:
    """The optimizer a ``*.optimizer`` group describes (the same fields, config-free)."""
    names = [f.name for f in dataclasses.fields(OptimizerSpec)]
    return OptimizerSpec(**{name: getattr(opt, name) for name in names})
