"""`TrainState` (params, optimizer state, update count) and its shardings over the train mesh."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxrlhf.interfaces.microbatch import replicated
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.handle import param_shardings
from jaxrlhf.models.transformer import Params, param_shapes
from jaxrlhf.optim import OptimizerSpec, make_optimizer


class TrainState(NamedTuple):
    """Everything a train step replaces; a pytree, donated to the step."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: optimizer updates applied so far


class ParamLayout(NamedTuple):
    """Which optional heads a parameter tree has (selects its structure and shardings)."""

    lm_head: bool
    value_head: bool

    @classmethod
    def of(cls, params: Params) -> ParamLayout:
        return cls(lm_head="lm_head" in params, value_head="value_head" in params)


def abstract_params(cfg: TransformerConfig, layout: ParamLayout) -> Any:
    """ShapeDtypeStructs of a parameter tree with ``layout``."""
    shapes = param_shapes(cfg, lm_head=layout.lm_head, value_head=layout.value_head)
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )


def state_shardings(
    cfg: TransformerConfig,
    layout: ParamLayout,
    tx: optax.GradientTransformation,
    mesh: Mesh | None,
) -> TrainState:
    """Shardings of a `TrainState`: optimizer moments like their params, counters replicated."""
    params = param_shardings(cfg, mesh, lm_head=layout.lm_head, value_head=layout.value_head)
    abstract_opt = jax.eval_shape(tx.init, abstract_params(cfg, layout))
    opt = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt,
        params,
        transform_non_params=lambda _: replicated(mesh),
    )
    return TrainState(params=params, opt_state=opt, step=replicated(mesh))


@functools.lru_cache(maxsize=32)
def _init_fn(
    cfg: TransformerConfig,
    layout: ParamLayout,
    opt: OptimizerSpec,
    total_steps: int | None,
    mesh: Mesh | None,
):
    tx = make_optimizer(opt, total_steps)
    shardings = state_shardings(cfg, layout, tx, mesh)
    return jax.jit(
        tx.init, in_shardings=(shardings.params,), out_shardings=shardings.opt_state
    ), shardings


def init_train_state(
    params: Params,
    cfg: TransformerConfig,
    opt: OptimizerSpec,
    *,
    total_steps: int | None = None,
    mesh: Mesh | None = None,
) -> TrainState:
    """A fresh state around ``params`` (held, not copied: train steps donate them, so do not
    use the arrays passed in afterwards). Optimizer state is created in its shards."""
    init, shardings = _init_fn(cfg, ParamLayout.of(params), opt, total_steps, mesh)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(params=params, opt_state=init(params), step=step)
