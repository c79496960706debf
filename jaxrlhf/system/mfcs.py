"""Implementations of the MFC interfaces named by the dataflow graph (`jaxrlhf.dfg`).

Each interface is registered in `MFC_INTERFACES` under the name the graph uses and exposes one
method per interface type it serves (``generate``, ``inference``, ``train``, ``compute``). A
method takes the coordinator's `StepContext`, the `MFC` and the step's data (graph keys ->
values) and returns the MFC's output keys. Per-token values are lists of token-aligned arrays
(one per sample), per-sample values are ``[N]`` arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    kl,
    masked_whiten,
    overlong_penalty,
    scores_to_token_rewards,
)
from jaxrlhf.config import Config
from jaxrlhf.dfg import MFC, MFC_INTERFACES
from jaxrlhf.hostio import fetch
from jaxrlhf.interfaces import (
    PackedBatch,
    ShapeFloors,
    TrainState,
    actor_microbatch_loss,
    bucket_size,
    compute_logprobs,
    compute_scores,
    compute_values,
    critic_microbatch_loss,
    pack_sequences,
    run_train_step,
    unpack,
    unpack_scalars,
)
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.transformer import Params
from jaxrlhf.system.rollout import Trajectories, response_aligned, token_aligned
from jaxrlhf.system.scoring import Scorer
from jaxrlhf.system.specs import actor_loss_spec, critic_loss_spec, optimizer_spec

Data = dict[str, Any]


@dataclasses.dataclass
class Models:
    """The models of one run: the actor and critic train states, the frozen reference."""

    actor_cfg: TransformerConfig
    actor: TrainState
    critic_cfg: TransformerConfig | None = None
    critic: TrainState | None = None
    ref_cfg: TransformerConfig | None = None
    ref_params: Params | None = None
    rm_cfg: TransformerConfig | None = None  # the frozen learned reward model (rm_inf)
    rm_params: Params | None = None


@dataclasses.dataclass
class StepContext:
    """What MFC implementations may use during one step (a host object; no device state)."""

    cfg: Config
    mesh: Mesh | None
    models: Models
    generation: Any  # the coordinator's `GenerationStrategy`: where actor_gen's samples come from
    tokenizer: Any
    scorer: Scorer  # the run's reward (training and evaluation score through it)
    step: int  # 1-based RL step
    version: int  # policy version that generates this step's samples
    updates_per_run: int  # optimizer updates over the whole run (the lr schedule horizon)
    shape_floors: ShapeFloors | None = None  # the run's packed-shape high-water marks
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def batch_shards(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @property
    def temperature(self) -> float:
        """Log-probs are taken at the sampling temperature (greedy: the plain softmax)."""
        return self.cfg.generation.temperature or 1.0

    def pack(self, data: Data, fields: dict[str, list[np.ndarray]], max_tokens: int,
             index: np.ndarray | None = None) -> PackedBatch:  # fmt: skip
        """Pack samples (all, or ``index``) into fixed-width micro-batches of ``max_tokens``,
        padded up to the run's `ShapeFloors` (which this batch may raise)."""
        select = (lambda xs: xs) if index is None else (lambda xs: [xs[i] for i in index])
        width = bucket_size(self.cfg.data.max_prompt_len + self.cfg.generation.max_new_tokens)
        seqs = select(data["input_ids"])
        budget = max(max_tokens, width)
        key = (len(seqs), budget)  # actor / ref / critic packs may use different budgets
        floors = {}
        if self.shape_floors is not None:
            # The grid starts at its largest (T = L): it only holds per-token fields, so its
            # padding costs little, and one long response would soon reach it anyway. Rows cost
            # model compute even when empty, so R grows with the batches, as M and S do.
            floors = {"min_grid_len": width}
            floors |= self.shape_floors.floors(key)
        packed = pack_sequences(
            seqs,
            {k: select(v) for k, v in fields.items()},
            max_tokens_per_mb=budget,
            row_len=width,
            rows_multiple=self.batch_shards,
            **floors,
        )
        if self.shape_floors is not None:
            self.shape_floors.update(key, packed)
        return packed


def _unpacked(packed: PackedBatch, grid: jax.Array) -> list[np.ndarray]:
    return unpack(packed, fetch(grid))


# --------------------------------------------------------------------------- actor


class PPOActor:
    """``ppo_actor``: generation (actor), log-probs (ref / proximal) and the policy update."""

    @staticmethod
    def generate(ctx: StepContext, mfc: MFC, data: Data) -> Data:
        traj = ctx.generation.trajectories(ctx, data)
        lens = traj.response_lens
        ctx.metrics |= {
            "response_len/mean": float(lens.mean()),
            "response_len/max": int(lens.max()),
            "response_len/truncated_frac": float(traj.truncated.mean()),
        }
        return {
            "trajectories": traj,
            "input_ids": traj.input_ids,
            "response_mask": traj.response_mask,
            "behav_logprobs": traj.behav_logprobs,
            "versions": traj.versions,
            "truncated": traj.truncated,
        }

    @staticmethod
    def inference(ctx: StepContext, mfc: MFC, data: Data) -> Data:
        m = ctx.models
        params, cfg = (
            (m.ref_params, m.ref_cfg) if mfc.role == "ref" else (m.actor.params, m.actor_cfg)
        )
        packed = ctx.pack(data, {}, mfc.mb_spec.max_tokens or ctx.cfg.actor.max_tokens_per_mb)
        out = compute_logprobs(params, cfg, packed, temperature=ctx.temperature, mesh=ctx.mesh)
        return {mfc.outputs[0]: _unpacked(packed, out["logp"])}

    @staticmethod
    def train(ctx: StepContext, mfc: MFC, data: Data) -> Data:
        cfg = ctx.cfg
        algo = cfg.algorithm
        mask, behav = data["response_mask"], data["behav_logprobs"]
        # One update per batch: π_old is the current policy itself, so the step takes it as
        # stop_gradient(π_θ) (ratio exactly 1) and no separate log-prob pass is needed.
        # Otherwise π_old is recomputed by the train engine before the first update.
        # Async "fused" proximal: π_prox = stop_gradient(π_θ) of this single update.
        fused = cfg.experiment.mode == "async" and cfg.async_ppo.proximal == "fused"
        one_update = algo.ppo_epochs == 1 and algo.n_minibatches == 1
        on_policy = one_update and (not algo.decoupled_loss or fused)
        spec = actor_loss_spec(
            algo, max_new_tokens=cfg.generation.max_new_tokens, temperature=ctx.temperature,
            on_policy=on_policy,
        )  # fmt: skip
        fields = {"loss_mask": mask, "advantages": data["advantages"], "behaviour_logp": behav}
        gap = None
        if not on_policy:
            old = (
                data["prox_logprobs"]  # actor_inf ran: reuse π_prox
                if "prox_logprobs" in data
                else PPOActor.inference(
                    ctx, dataclasses.replace(mfc, role="actor", outputs=("old_logp",)), data
                )["old_logp"]
            )
            fields["old_logp"] = old
            gap = np.concatenate(
                [np.abs(o - b)[k > 0] for o, b, k in zip(old, behav, mask, strict=True)]
            )
        if "ref_logprobs" in data:  # the KL loss term, or with kl_coef 0 only its metric
            fields["ref_logp"] = data["ref_logprobs"]
        metrics = _train_epochs(ctx, data, fields, "actor", actor_microbatch_loss, spec)
        if gap is not None and gap.size:  # measured before any update, not per minibatch
            metrics |= {"logprob_gap": float(gap.mean()), "logprob_gap_max": float(gap.max())}
        ctx.metrics |= {f"actor/{k}": v for k, v in metrics.items()}
        return {}


def _train_epochs(
    ctx: StepContext, data: Data, fields: dict, role: str, mb_loss: Any, spec: Any
) -> dict[str, float]:
    """``ppo_epochs`` passes over the batch, each in ``n_minibatches`` updates of the ``role``
    model (``actor`` / ``critic``: its train state, ``<role>.optimizer`` and token budget) with
    ``mb_loss``; metrics averaged over the updates (``*_max`` / ``*_min``: max / min)."""
    cfg, algo = ctx.cfg, ctx.cfg.algorithm
    role_cfg = getattr(cfg, role)
    model_cfg = getattr(ctx.models, f"{role}_cfg")
    opt = optimizer_spec(role_cfg.optimizer)
    n = len(data["input_ids"])
    rng = np.random.default_rng((ctx.cfg.experiment.seed, ctx.step, 0 if role == "actor" else 1))
    totals: dict[str, float] = {}
    n_updates = algo.ppo_epochs * algo.n_minibatches
    for _ in range(algo.ppo_epochs):
        order = rng.permutation(n) if algo.n_minibatches > 1 else np.arange(n)
        for index in np.array_split(order, algo.n_minibatches):
            packed = ctx.pack(data, fields, role_cfg.max_tokens_per_mb, np.sort(index))
            state, metrics = run_train_step(
                mb_loss, getattr(ctx.models, role), packed, cfg=model_cfg, spec=spec, opt=opt,
                total_steps=ctx.updates_per_run, mesh=ctx.mesh,
            )  # fmt: skip
            setattr(ctx.models, role, state)
            for k, v in fetch(metrics).items():
                v = float(v)
                if k.endswith("_max"):
                    totals[k] = max(totals.get(k, v), v)
                elif k.endswith("_min"):
                    totals[k] = min(totals.get(k, v), v)
                else:
                    totals[k] = totals.get(k, 0.0) + v / n_updates
    return totals


# --------------------------------------------------------------------------- critic


class PPOCritic:
    """``ppo_critic``: value inference and the value update."""

    @staticmethod
    def inference(ctx: StepContext, mfc: MFC, data: Data) -> Data:
        m = ctx.models
        packed = ctx.pack(data, {}, mfc.mb_spec.max_tokens or ctx.cfg.critic.max_tokens_per_mb)
        out = compute_values(m.critic.params, m.critic_cfg, packed, mesh=ctx.mesh)
        return {"values": _unpacked(packed, out["values"])}

    @staticmethod
    def train(ctx: StepContext, mfc: MFC, data: Data) -> Data:
        cfg = ctx.cfg
        spec = critic_loss_spec(cfg.algorithm)
        fields = {"loss_mask": data["response_mask"], "returns": data["returns"]}
        if spec.value_clip:
            fields["old_values"] = data["values"]
        metrics = _train_epochs(ctx, data, fields, "critic", critic_microbatch_loss, spec)
        ctx.metrics |= {f"critic/{k}": v for k, v in metrics.items()}
        return {}


# --------------------------------------------------------------------------- rewards, advantages


class RuleReward:
    """``rule_reward``: the task verifier / configured reward function on decoded responses."""

    @staticmethod
    def compute(ctx: StepContext, mfc: MFC, data: Data) -> Data:
        traj: Trajectories = data["trajectories"]
        scores, failures = ctx.scorer.score(traj)
        groups = scores.reshape(-1, traj.group_size)
        ctx.metrics |= failures | {
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()),
            "reward/zero_std_group_frac": float((groups.std(axis=1) == 0).mean()),
        }
        return {"scores": scores}


class RewardModel:
    """``reward_model``: the learned reward model's score of each whole sample (the value head at
    its last token), ``rm_scores`` ``[N]``; ``advantages`` weighs it with the rule scores."""

    @staticmethod
    def inference(ctx: StepContext, mfc: MFC, data: Data) -> Data:
        m = ctx.models
        max_tokens = mfc.mb_spec.max_tokens or ctx.cfg.reward_model.max_tokens_per_mb
        packed = ctx.pack(data, {}, max_tokens)
        out = compute_scores(m.rm_params, m.rm_cfg, packed, mesh=ctx.mesh)
        rm_scores = unpack_scalars(packed, fetch(out["scores"]))
        ctx.metrics |= {"reward/rm_mean": float(rm_scores.mean()),
                        "reward/rm_std": float(rm_scores.std())}  # fmt: skip
        return {mfc.outputs[0]: rm_scores}


@functools.lru_cache(maxsize=16)
def _advantage_fn(estimate, group_size: int, gamma: float, lam: float, kl_coef: float,
                  kl_estimator: str, whiten: bool):  # fmt: skip
    """Jitted: response-aligned rewards (score at the last token, minus the KL penalty) ->
    (advantages, returns); ``estimate`` is the registered estimator (the cache key, so a name
    registered again gets a new trace). ``truncated_n`` (None: all terminal) bootstraps rows."""

    def fn(scores_n, mask_nr, values_nr, logp_nr, ref_nr, truncated_n):
        rewards = scores_to_token_rewards(scores_n, mask_nr)
        kl_nr = jnp.zeros_like(rewards)
        if ref_nr is not None:
            kl_nr = kl(logp_nr, ref_nr, kl_estimator, mask=mask_nr)
            rewards = rewards - kl_coef * kl_nr
        boot = {} if truncated_n is None else {"bootstrap_b": truncated_n}
        adv, ret = estimate(
            rewards, mask_nr, values_bt=values_nr, group_size=group_size, gamma=gamma, lam=lam,
            **boot,
        )  # fmt: skip
        if whiten:
            adv = masked_whiten(adv, mask_nr)
        return adv, ret, kl_nr

    return jax.jit(fn)


class Advantages:
    """``advantages``: token rewards, then the configured estimator (GAE / group / REINFORCE++).

    Scores get the DAPO overlong penalty when ``algorithm.overlong_buffer_len`` is set; responses
    cut at ``generation.max_new_tokens`` bootstrap when the graph passes ``truncated``."""

    @staticmethod
    def compute(ctx: StepContext, mfc: MFC, data: Data) -> Data:
        cfg = ctx.cfg
        algo = cfg.algorithm
        width = cfg.generation.max_new_tokens
        resp_mask = data["response_mask"]
        field = lambda key: response_aligned(data[key], resp_mask, width)
        mask = field("response_mask")
        scores = np.asarray(data["scores"], np.float32)
        if "rm_scores" in data:
            rm = cfg.reward_model
            scores = rm.rule_weight * scores + rm.weight * np.asarray(data["rm_scores"], np.float32)
            ctx.metrics["reward/total_mean"] = float(scores.mean())
        if algo.overlong_buffer_len is not None:
            penalty = np.asarray(overlong_penalty(
                mask.sum(axis=1), max_length=width, buffer_length=algo.overlong_buffer_len,
                penalty=algo.overlong_penalty_factor,
            ))  # fmt: skip
            scores = scores + penalty
            ctx.metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
        values = field("values") if "values" in data else None
        truncated = np.asarray(data["truncated"], bool) if "truncated" in data else None
        ref = logp = None
        if "ref_logprobs" in data:
            ref = field("ref_logprobs")
            # the KL penalty is taken from the policy the update starts at (π_prox when it exists)
            old = "prox_logprobs" if "prox_logprobs" in data else "behav_logprobs"
            logp = field(old)
        est = ADVANTAGE_ESTIMATORS.info(algo.advantage_estimator)
        fn = _advantage_fn(
            ADVANTAGE_ESTIMATORS.get(algo.advantage_estimator), cfg.generation.n_samples,
            algo.gamma, algo.lam, algo.kl_coef if algo.kl_in_reward else 0.0, algo.kl_estimator,
            algo.adv_norm and bool(est.get("adv_norm")),
        )  # fmt: skip
        adv, ret, kl_nr = jax.device_get(fn(scores, mask, values, logp, ref, truncated))
        if ref is not None:
            ctx.metrics["actor/kl_ref"] = float((kl_nr * mask).sum() / max(mask.sum(), 1.0))
        out = {"advantages": token_aligned(adv, resp_mask)}
        if "returns" in mfc.outputs:
            out["returns"] = token_aligned(ret, resp_mask)
        return out


MFC_INTERFACES.register("ppo_actor", PPOActor)
MFC_INTERFACES.register("ppo_critic", PPOCritic)
MFC_INTERFACES.register("rule_reward", RuleReward)
MFC_INTERFACES.register("advantages", Advantages)
MFC_INTERFACES.register("reward_model", RewardModel)
