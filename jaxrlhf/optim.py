"""Optimizer from an `OptimizerSpec`: AdamW, warm-up + constant / cosine / linear learning rate,
global-norm gradient clipping (optax). The spec is config-free and hashable, so compiled train
steps are cached on it; the system layer builds it from ``*.optimizer`` (`system.specs`).

Schedule (``count`` = number of updates already applied, so the first update uses count 0):

- warm-up, ``count < warmup_steps``: lr · (count + 1) / warmup_steps (the first update is not
  wasted at lr 0; the last warm-up update uses the peak lr);
- then ``constant``: lr; ``cosine``: lr · (m + (1 − m)·½(1 + cos π p)); ``linear``:
  lr · (1 − (1 − m)·p), with m = ``min_lr_ratio`` and p = (count − warmup) / (total − warmup)
  clipped to [0, 1], so the decay reaches lr · m at ``count == total_steps``.

Weight decay is decoupled (AdamW, scaled by the lr as in PyTorch) and skips norm scales and
biases (parameters whose name ends in ``norm`` or ``bias``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

NO_DECAY_SUFFIXES = ("norm", "bias")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """AdamW and its learning-rate schedule (frozen, hashable: compiled steps are cached on it)."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # final lr / lr of the cosine and linear decays


def lr_schedule(cfg: OptimizerSpec, total_steps: int | None = None) -> optax.Schedule:
    """Learning rate as a function of the update count (see the module docstring)."""
    if cfg.schedule != "constant" and (total_steps is None or total_steps < 1):
        raise ValueError(
            f"optimizer.schedule {cfg.schedule!r} needs total_steps >= 1 (the decay horizon), "
            f"got {total_steps}."
        )
    peak, warmup, floor = float(cfg.lr), int(cfg.warmup_steps), float(cfg.min_lr_ratio)
    span = float(max((total_steps or 0) - warmup, 1))

    def schedule(count: Any) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        if cfg.schedule == "constant":
            decay = jnp.ones_like(step)
        else:
            progress = jnp.clip((step - warmup) / span, 0.0, 1.0)
            if cfg.schedule == "cosine":
                decay = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
            else:
                decay = 1.0 - (1.0 - floor) * progress
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        return peak * jnp.where(step < warmup, warm, decay)

    return schedule


def weight_decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: not norm scales or biases."""

    def decays(path: tuple, _leaf: Any) -> bool:
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        return not name.endswith(NO_DECAY_SUFFIXES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    cfg: OptimizerSpec, total_steps: int | None = None
) -> optax.GradientTransformation:
    """Global-norm clipping (when ``cfg.grad_clip`` is set) followed by AdamW on `lr_schedule`."""
    adamw = optax.adamw(
        learning_rate=lr_schedule(cfg, total_steps),
        b1=cfg.betas[0],
        b2=cfg.betas[1],
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask,
    )
    if cfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
