"""Build the models of a run from the experiment config: load an HF checkpoint or initialise
from scratch (`build_model`), and the models derived from the actor (`build_reference`,
`build_critic`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrlhf.config import CriticConfig, ModelConfig, RefConfig
from jaxrlhf.models.config import RopeConfig, TransformerConfig
from jaxrlhf.models.handle import ModelHandle, init_model, param_shardings
from jaxrlhf.models.hf_io import from_pretrained


def _same_fields(target: type, source: Any) -> dict[str, Any]:
    """``source``'s values of the dataclass fields ``target`` shares with it by name."""
    names = {f.name for f in dataclasses.fields(source)}
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(target) if f.name in names}


def transformer_config(cfg: ModelConfig) -> TransformerConfig:
    """The architecture a from-scratch ``ModelConfig`` describes (bias and q/k-norm by family).

    Fields named alike in the experiment config and the model config mean the same and are
    copied; the rest is derived here.
    """
    scaling = {} if cfg.rope_scaling is None else _same_fields(RopeConfig, cfg.rope_scaling)
    return TransformerConfig(
        **_same_fields(TransformerConfig, cfg),
        rope=RopeConfig(theta=cfg.rope_theta, **scaling),
        qkv_bias=cfg.model_type == "qwen2",
        qk_norm=cfg.model_type == "qwen3",
    )


def _load(
    cfg: ModelConfig | CriticConfig | RefConfig,
    mesh: Mesh | None,
    *,
    lm_head: bool = True,
    value_head: bool = False,
    key: str,
) -> ModelHandle:
    """The HF model ``cfg.path`` (config key ``key``) in ``cfg``'s dtypes (and remat, where it
    has one)."""
    return from_pretrained(
        cfg.path,
        cfg.param_dtype,
        compute_dtype=cfg.compute_dtype,
        mesh=mesh,
        remat=getattr(cfg, "remat", False),
        lm_head=lm_head,
        value_head=value_head,
        key=key,
    )


def build_model(
    cfg: ModelConfig,
    *,
    mesh: Mesh | None = None,
    seed: int = 0,
    lm_head: bool = True,
    value_head: bool = False,
    key: str = "actor.path",
) -> ModelHandle:
    """``cfg.path`` set: load that HF model (its config.json wins over the arch fields; ``key``
    names the config key in errors); otherwise a random model of the configured architecture."""
    if cfg.path is not None:
        return _load(cfg, mesh, lm_head=lm_head, value_head=value_head, key=key)
    return init_model(
        transformer_config(cfg), seed, mesh=mesh, lm_head=lm_head, value_head=value_head
    )


def derived_model(
    base: ModelHandle,
    *,
    param_dtype: str,
    compute_dtype: str,
    remat: bool | None = None,
    value_head: bool = False,
) -> ModelHandle:
    """A model that starts from ``base``'s weights in its own dtypes (a fresh copy: train steps
    donate their state). ``value_head``: the trunk without the LM head plus a zero-initialised
    scalar head (a critic that starts at V = 0)."""
    cfg = base.config.replace(param_dtype=param_dtype, compute_dtype=compute_dtype)
    if remat is not None:
        cfg = cfg.replace(remat=remat)
    dtype = jnp.dtype(param_dtype)
    params = {k: v for k, v in base.params.items() if not (value_head and k == "lm_head")}
    params = jax.tree.map(lambda a: jnp.array(a, dtype=dtype, copy=True), params)
    lm_head = "lm_head" in params
    if value_head:
        params["value_head"] = {
            "kernel": jnp.zeros((cfg.hidden_size,), dtype),
            "bias": jnp.zeros((), dtype),
        }
    shardings = param_shardings(cfg, base.mesh, lm_head=lm_head, value_head=value_head)
    return ModelHandle(cfg, jax.device_put(params, shardings), base.mesh)


def build_critic(cfg: CriticConfig, actor: ModelHandle, *, mesh: Mesh | None = None) -> ModelHandle:
    """The value model: ``cfg.path`` with a fresh value head, or the actor's trunk."""
    if cfg.path is not None:
        return _load(cfg, mesh, lm_head=False, value_head=True, key="critic.path")
    return derived_model(
        actor,
        param_dtype=cfg.param_dtype,
        compute_dtype=cfg.compute_dtype,
        remat=cfg.remat,
        value_head=True,
    )


def build_reference(cfg: RefConfig, actor: ModelHandle, *, mesh: Mesh | None = None) -> ModelHandle:
    """The frozen reference policy: ``cfg.path``, or the actor's initial weights, in the
    reference's dtypes either way (unset: the actor's)."""
    cfg = dataclasses.replace(
        cfg,
        param_dtype=cfg.param_dtype or actor.config.param_dtype,
        compute_dtype=cfg.compute_dtype or actor.config.compute_dtype,
    )
    if cfg.path is not None:
        return _load(cfg, mesh, key="ref.path")
    return derived_model(actor, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
