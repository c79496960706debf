"""Registries through which a config selects algorithm pieces by name, and their metadata.

``algorithm.policy_loss`` -> `POLICY_LOSSES`, ``algorithm.advantage_estimator`` ->
`ADVANTAGE_ESTIMATORS`, ``algorithm.kl_estimator`` -> `KL_ESTIMATORS`, ``algorithm.loss_agg``
-> `LOSS_AGGREGATIONS`. Importing `jaxrlhf.algorithms` fills them.

Every entry describes itself, so the graph, the MFCs and the config ask the registry instead of
keeping their own tables of names. Register through the helpers below, which fill every key:

- advantage estimators: ``label`` (graph label, e.g. "GRPO"), ``needs_values`` (reads a critic's
  values), ``group`` (compares the samples of one prompt: needs ``generation.n_samples >= 2``),
  ``adv_norm`` (``algorithm.adv_norm`` whitens its output over the batch: GAE; group advantages
  are already relative to their group and REINFORCE++ whitens its own), ``aggregation`` (the
  loss aggregation it implies, or None) and ``norm_constant`` (None or ``"max_new_tokens"``:
  what ``seq_mean_token_sum_norm`` divides by).
- policy losses: ``aggregation`` (default, or None: the estimator's / ``token_mean``) and
  ``aggregations`` (the allowed ones, or None: any).
- KL estimators: ``help``. Loss aggregations: ``sequence_level`` (per-sequence means first),
  ``uses_norm_constant``, ``help``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from jaxrlhf.registry import Registry

F = TypeVar("F", bound=Callable[..., Any])

POLICY_LOSSES: Registry[Callable[..., Any]] = Registry("policy loss")
ADVANTAGE_ESTIMATORS: Registry[Callable[..., Any]] = Registry("advantage estimator")
KL_ESTIMATORS: Registry[Callable[..., Any]] = Registry("KL estimator")
LOSS_AGGREGATIONS: Registry[Callable[..., Any]] = Registry("loss aggregation")

NORM_CONSTANTS = (None, "max_new_tokens")


def register_advantage_estimator(
    name: str,
    fn: F | None = None,
    *,
    label: str,
    needs_values: bool,
    group: bool,
    adv_norm: bool = False,
    aggregation: str | None = None,
    norm_constant: str | None = None,
) -> Any:
    """Register an estimator ``fn(rewards_bt, mask_bt, *, values_bt, group_size, gamma, lam,
    eps) -> (advantages_bt, returns_bt)`` (with ``needs_values`` also ``bootstrap_b``); a
    decorator when ``fn`` is omitted. See the module docstring for the metadata."""
    if norm_constant not in NORM_CONSTANTS:
        raise ValueError(
            f"advantage estimator {name!r}: norm_constant must be one of {NORM_CONSTANTS}, "
            f"got {norm_constant!r}."
        )
    info = dict(label=label, needs_values=bool(needs_values), group=bool(group),
                adv_norm=bool(adv_norm), aggregation=aggregation,
                norm_constant=norm_constant)  # fmt: skip
    return ADVANTAGE_ESTIMATORS.register(name, fn, **info)


def register_policy_loss(
    name: str,
    fn: F | None = None,
    *,
    aggregation: str | None = None,
    aggregations: Sequence[str] | None = None,
) -> Any:
    """Register a policy loss with the signature of `ppo_actor_loss`; a decorator when ``fn`` is
    omitted. ``aggregations`` (None: any) must contain ``aggregation`` when both are given."""
    allowed = None if aggregations is None else tuple(aggregations)
    if allowed is not None and aggregation is not None and aggregation not in allowed:
        raise ValueError(
            f"policy loss {name!r}: default aggregation {aggregation!r} is not among its allowed "
            f"aggregations {allowed}."
        )
    return POLICY_LOSSES.register(name, fn, aggregation=aggregation, aggregations=allowed)


def effective_loss_aggregation(
    policy_loss: str,
    estimator: str,
    loss_agg: str | None,
    loss_norm_constant: float | None,
    max_new_tokens: int,
) -> tuple[str, float | None]:
    """(aggregation, norm constant) of the actor loss, from the config's four settings.

    The aggregation: an explicit ``loss_agg`` wins; else the policy loss's default (GSPO:
    ``seq_mean_token_mean``); else the estimator's (Dr.GRPO: ``seq_mean_token_sum_norm``); else
    ``token_mean``. A ``loss_agg`` the policy loss does not allow raises ValueError. The constant
    (only for aggregations that use one, else None): ``loss_norm_constant`` if given, else
    ``max_new_tokens`` (the longest response: one constant for every micro-batch, not the padded
    grid width).
    """
    loss_info = POLICY_LOSSES.info(policy_loss)
    est_info = ADVANTAGE_ESTIMATORS.info(estimator)
    allowed = loss_info.get("aggregations")
    if loss_agg is not None:
        LOSS_AGGREGATIONS.check(loss_agg, key="algorithm.loss_agg")
        if allowed is not None and loss_agg not in allowed:
            raise ValueError(
                f"algorithm.loss_agg {loss_agg!r} contradicts algorithm.policy_loss "
                f"{policy_loss!r}, which allows only {', '.join(allowed)}; drop "
                "algorithm.loss_agg to use its default"
            )
        mode = loss_agg
    else:
        est_mode = est_info.get("aggregation")
        if est_mode is not None and allowed is not None and est_mode not in allowed:
            est_mode = None  # the policy loss cannot use it: its own default applies
        mode = loss_info.get("aggregation") or est_mode or "token_mean"
    if not LOSS_AGGREGATIONS.info(mode).get("uses_norm_constant", False):
        return mode, None
    if loss_norm_constant is not None:
        return mode, float(loss_norm_constant)
    return mode, float(max_new_tokens)


def effective_truncation(truncation: str | None, estimator: str) -> str:
    """How a response cut at ``generation.max_new_tokens`` ends: ``"bootstrap"`` (its last
    token's successor has the critic's value) or ``"terminal"``.

    None resolves to bootstrap for an estimator that ``needs_values`` (a critic) and to terminal
    otherwise; ``"bootstrap"`` without values has nothing to bootstrap from and raises ValueError.
    """
    needs_values = ADVANTAGE_ESTIMATORS.info(estimator).get("needs_values", False)
    if truncation is None:
        return "bootstrap" if needs_values else "terminal"
    if truncation not in ("bootstrap", "terminal"):
        raise ValueError(
            f"algorithm.truncation must be 'bootstrap', 'terminal' or null, got {truncation!r}."
        )
    if truncation == "bootstrap" and not needs_values:
        raise ValueError(
            f"algorithm.truncation 'bootstrap' needs a critic's values, but "
            f"algorithm.advantage_estimator {estimator!r} uses none; use 'terminal' or null."
        )
    return truncation
