"""`ModelHandle`: a thin host object holding a config, sharded params and cached jitted steps."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.sharding import logical_to_spec, tree_shardings
from jaxrlhf.models.transformer import (
    Params,
    forward_logits,
    init_params,
    param_axes,
    param_shapes,
)


def param_shardings(
    cfg: TransformerConfig, mesh: Mesh | None, *, lm_head: bool = True, value_head: bool = False
) -> Any:
    """Sharding of every parameter (single device when ``mesh`` is None)."""
    axes = param_axes(cfg, lm_head=lm_head, value_head=value_head)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, axes, is_leaf=lambda x: isinstance(x, tuple))
    return tree_shardings(mesh, axes, param_shapes(cfg, lm_head=lm_head, value_head=value_head))


def batch_sharding(mesh: Mesh | None, shape: tuple[int, ...]) -> jax.sharding.Sharding:
    """Sharding for a `[B, T, ...]` batch array: batch over the data and fsdp axes."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    axes = ("batch", "seq") + (None,) * (len(shape) - 2)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


@functools.cache
def _logits_fn(cfg: TransformerConfig, mesh: Mesh | None, shape: tuple[int, int]):
    """One compiled logits step per (config, mesh, input shape)."""
    out = batch_sharding(mesh, (*shape, cfg.vocab_size))
    return jax.jit(
        lambda params, ids, mask: forward_logits(params, cfg, ids, mask, mesh),
        in_shardings=(
            param_shardings(cfg, mesh),
            batch_sharding(mesh, shape),
            batch_sharding(mesh, shape),
        ),
        out_shardings=out,
    )


@dataclasses.dataclass
class ModelHandle:
    """A model ready to run: architecture, parameters (sharded over ``mesh``) and HF metadata."""

    config: TransformerConfig
    params: Params
    mesh: Mesh | None = None
    hf_config: dict | None = None
    source_path: str | None = None

    def logits(self, input_ids: Any, attention_mask: Any | None = None) -> jax.Array:
        """Float32 logits `[B, T, V]`; ``attention_mask`` is 1 at real tokens, 0 at padding.

        Left-padded rows give, at their real tokens, the logits of the row run alone.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {input_ids.shape}.")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} does not match input_ids "
                f"{input_ids.shape}."
            )
        fn = _logits_fn(self.config, self.mesh, tuple(input_ids.shape))
        return fn(
            self.params,
            jax.device_put(input_ids, batch_sharding(self.mesh, input_ids.shape)),
            jax.device_put(attention_mask, batch_sharding(self.mesh, input_ids.shape)),
        )


def init_model(
    cfg: TransformerConfig,
    seed: int = 0,
    *,
    mesh: Mesh | None = None,
    lm_head: bool = True,
    value_head: bool = False,
) -> ModelHandle:
    """A randomly initialised model whose parameters are created directly in their shards."""
    init = _init_fn(cfg, mesh, lm_head, value_head)
    return ModelHandle(config=cfg, params=init(jax.random.key(seed)), mesh=mesh)


@functools.cache
def _init_fn(cfg: TransformerConfig, mesh: Mesh | None, lm_head: bool, value_head: bool):
    """One compiled initialiser per (config, mesh, heads): tests and launchers call it often."""
    return jax.jit(
        functools.partial(init_params, cfg, lm_head=lm_head, value_head=value_head),
        out_shardings=param_shardings(cfg, mesh, lm_head=lm_head, value_head=value_head),
    )
