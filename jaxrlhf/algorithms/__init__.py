"""RL algorithm pieces as pure, jit-friendly functions over masked ``[batch, time]`` grids.

Selected by name from the config through the registries: ``algorithm.policy_loss`` ->
`POLICY_LOSSES` (ppo, gspo), ``algorithm.advantage_estimator`` -> `ADVANTAGE_ESTIMATORS`
(gae, grpo, dr_grpo, rloo, reinforce_pp), KL estimators -> `KL_ESTIMATORS` (k1, k2, k3), loss
aggregation -> `LOSS_AGGREGATIONS`. The supervised objectives (`masked_nll` for SFT,
`bradley_terry` for reward models) are plain functions. String arguments (estimator,
aggregation, method) are static: close over them (``functools.partial``) or mark them static
when jitting.

Each entry carries its metadata (``REGISTRY.info(name)``; see `registries`): a new estimator or
loss is one function plus `register_advantage_estimator` / `register_policy_loss`.
`effective_loss_aggregation` resolves the actor loss's aggregation from that metadata.
"""

from jaxrlhf.algorithms.advantages import (
    gae,
    group_advantages,
    last_valid,
    overlong_penalty,
    reinforce_pp_advantages,
    returns_to_go,
    scale_and_clip_rewards,
    scores_to_token_rewards,
)
from jaxrlhf.algorithms.aggregation import (
    Denominators,
    aggregate,
    loss_denominators,
    masked_max,
    masked_mean,
    masked_min,
    masked_sum,
    masked_var,
    masked_whiten,
)
from jaxrlhf.algorithms.critic_loss import critic_loss
from jaxrlhf.algorithms.entropy import entropy_bonus, entropy_from_logits
from jaxrlhf.algorithms.kl import LOG_RATIO_BOUND, clamp_log_ratio, kl, kl_loss, kl_reward_penalty
from jaxrlhf.algorithms.policy_loss import behaviour_weights, gspo_actor_loss, ppo_actor_loss
from jaxrlhf.algorithms.registries import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    effective_loss_aggregation,
    effective_truncation,
    register_advantage_estimator,
    register_policy_loss,
)
from jaxrlhf.algorithms.supervised import bradley_terry, masked_nll

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOG_RATIO_BOUND",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "Denominators",
    "aggregate",
    "behaviour_weights",
    "bradley_terry",
    "clamp_log_ratio",
    "critic_loss",
    "effective_loss_aggregation",
    "effective_truncation",
    "entropy_bonus",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "gspo_actor_loss",
    "kl",
    "kl_loss",
    "kl_reward_penalty",
    "last_valid",
    "loss_denominators",
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_nll",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "ppo_actor_loss",
    "register_advantage_estimator",
    "register_policy_loss",
    "reinforce_pp_advantages",
    "returns_to_go",
    "scale_and_clip_rewards",
    "scores_to_token_rewards",
]
