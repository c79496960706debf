"""Build a model from the experiment config: load an HF checkpoint or initialise from scratch."""

from __future__ import annotations

from jax.sharding import Mesh

from jaxrlhf.config import ModelConfig
from jaxrlhf.models.config import RopeConfig, TransformerConfig
from jaxrlhf.models.handle import ModelHandle, init_model
from jaxrlhf.models.hf_io import from_pretrained


def transformer_config(cfg: ModelConfig) -> TransformerConfig:
    """The architecture a from-scratch ``ModelConfig`` describes (bias and q/k-norm by family)."""
    scaling = cfg.rope_scaling
    rope = RopeConfig(theta=cfg.rope_theta)
    if scaling is not None:
        rope = RopeConfig(
            theta=cfg.rope_theta,
            rope_type=scaling.rope_type,
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    return TransformerConfig(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope=rope,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        qkv_bias=cfg.model_type == "qwen2",
        qk_norm=cfg.model_type == "qwen3",
        initializer_range=cfg.initializer_range,
        param_dtype=cfg.param_dtype,
        compute_dtype=cfg.compute_dtype,
        remat=cfg.remat,
    )


def build_model(
    cfg: ModelConfig,
    *,
    mesh: Mesh | None = None,
    seed: int = 0,
    lm_head: bool = True,
    value_head: bool = False,
) -> ModelHandle:
    """``cfg.path`` set: load that HF directory (its config.json wins over the arch fields);
    otherwise a random model of the configured architecture."""
    if cfg.path is not None:
        return from_pretrained(
            cfg.path,
            cfg.param_dtype,
            compute_dtype=cfg.compute_dtype,
            mesh=mesh,
            remat=cfg.remat,
            lm_head=lm_head,
            value_head=value_head,
        )
    return init_model(
        transformer_config(cfg), seed, mesh=mesh, lm_head=lm_head, value_head=value_head
    )
