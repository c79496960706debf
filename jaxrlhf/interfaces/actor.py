"""The actor's micro-batch loss (MFC ``actor_train``): policy loss + optional KL-to-reference
and entropy terms. `train.run_train_step(actor_microbatch_loss, ..., spec=ActorLossSpec(...))`
accumulates it over packed micro-batches and applies one clipped AdamW update.

Batch fields (grid ``[M, S, T]``, token-aligned, see `packing.py`): ``loss_mask``,
``advantages``, ``old_logp`` (π_old / π_prox: the log-probs the ratio is taken against; not
needed when ``spec.on_policy``), plus ``behaviour_logp`` when ``spec.decoupled`` (asynchronous
PPO) and ``ref_logp`` when ``spec.kl_coef > 0`` (also used for the ``kl`` metric whenever given).

π_old from a separate log-prob pass (`compute_logprobs`) is a different XLA program, so at an
unchanged policy the ratio is 1 only to float rounding (|r − 1| ~ 1e-7). ``spec.on_policy``
takes π_old = stop_gradient(π_θ) inside the step instead: the ratio is exactly 1 and the extra
forward pass is saved; it is right when each batch gets a single update.

Metrics per step: ``loss`` (the whole objective), ``pg_loss``, ``kl_loss``, ``entropy_loss``,
``clip_frac`` (+ ``_low`` / ``_high``, ``dual_clip_frac``), ``approx_kl`` (vs π_old),
``kl`` (vs the reference), ``entropy``, ``ratio_*``, ``importance_weight_*``, ``tokens``,
``seqs``, ``grad_norm`` (before clipping), ``lr``, ``update_skipped``, ``nonfinite_skipped``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrlhf.algorithms import POLICY_LOSSES, Denominators, entropy_bonus, kl_loss
from jaxrlhf.interfaces.microbatch import Batch, loss_mask, microbatch_logprobs
from jaxrlhf.interfaces.train import LossSpec, Metrics
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params


@dataclasses.dataclass(frozen=True)
class ActorLossSpec(LossSpec):
    """Static settings of the actor objective (hashable: compiled steps are cached on it)."""

    name: ClassVar[str] = "actor"

    policy_loss: str = "ppo"  # name in POLICY_LOSSES: ppo | gspo
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    dual_clip: float | None = None
    decoupled: bool = False  # weight tokens by π_prox / π_behaviour (needs behaviour_logp)
    behaviour_weight_cap: float | None = None
    behaviour_weight_mode: str = "truncate"
    aggregation: str = "token_mean"
    norm_constant: float | None = None
    kl_coef: float = 0.0  # KL-to-reference loss term (needs ref_logp)
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    on_policy: bool = False  # π_old = stop_gradient(π_θ): one update per batch, no old_logp
    temperature: float = 1.0  # the sampling temperature: logits are divided by it
    logits_chunk: int | None = None  # tokens per chunk of the log-prob pass (memory bound)

    def required_fields(self) -> tuple[str, ...]:
        """``loss_mask``, ``advantages`` and the log-probs the objective reads."""
        fields = ("loss_mask", "advantages") + (() if self.on_policy else ("old_logp",))
        fields += ("behaviour_logp",) if self.decoupled else ()
        return fields + (("ref_logp",) if self.kl_coef > 0 else ())


def actor_microbatch_loss(
    params: Params, mb: Batch, den: Denominators, *, cfg: TransformerConfig, spec: ActorLossSpec,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, Metrics]:  # fmt: skip
    """This micro-batch's share of the actor objective (normalised by the batch's ``den``)."""
    logp, entropy = microbatch_logprobs(params, cfg, mb, temperature=spec.temperature,
                                        chunk_size=spec.logits_chunk, with_entropy=True,
                                        mesh=mesh)  # fmt: skip
    mask = loss_mask(mb)
    agg = dict(aggregation=spec.aggregation, denominators=den, norm_constant=spec.norm_constant)
    old_logp = jax.lax.stop_gradient(logp) if spec.on_policy else mb["old_logp"]
    pg_loss, metrics = POLICY_LOSSES.get(spec.policy_loss)(
        logp,
        old_logp,
        mb["behaviour_logp"] if spec.decoupled else None,
        mb["advantages"],
        mask,
        eps_clip=spec.eps_clip,
        eps_clip_high=spec.eps_clip_high,
        dual_clip=spec.dual_clip,
        behaviour_weight_cap=spec.behaviour_weight_cap,
        behaviour_weight_mode=spec.behaviour_weight_mode,
        **agg,
    )
    metrics = {k: v for k, v in metrics.items() if k != "loss"} | {"pg_loss": pg_loss}
    loss = pg_loss
    if not spec.entropy_coef:  # a metric only: no gradient through the entropy
        entropy = jax.lax.stop_gradient(entropy)
    entropy_loss, ent_metrics = entropy_bonus(entropy, mask, coef=spec.entropy_coef, **agg)
    metrics |= ent_metrics | {"entropy_loss": entropy_loss}
    loss = loss + entropy_loss
    if "ref_logp" in mb:
        logp_for_kl = logp if spec.kl_coef else jax.lax.stop_gradient(logp)
        kl_term, kl_metrics = kl_loss(
            logp_for_kl, mb["ref_logp"], mask, coef=spec.kl_coef, estimator=spec.kl_estimator, **agg
        )
        metrics |= kl_metrics | {"kl_loss": kl_term}
        loss = loss + kl_term
    if "behaviour_logp" in mb:  # the train-vs-rollout log-prob gap (same weights: numerics only)
        gap = jnp.abs(jax.lax.stop_gradient(logp) - mb["behaviour_logp"]) * mask
        metrics["logprob_gap"] = jnp.sum(gap) / jnp.maximum(jnp.sum(mask), 1.0)
        metrics["logprob_gap_max"] = jnp.max(gap)
    metrics["loss"] = loss
    metrics["seqs"] = jnp.sum(jnp.any(mask > 0, axis=-1), dtype=jnp.float32)
    return loss, jax.lax.stop_gradient(metrics)
